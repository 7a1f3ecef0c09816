"""The PostgreSQL metadata backend (``Store("postgresql://...", payloads=...)``; the ``postgres``
extra). Imported only when a store names PostgreSQL: ``import mxm_dataio_async`` never imports
asyncpg."""

try:
    import asyncpg  # type: ignore[import-untyped]  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PostgreSQL stores need asyncpg, which the postgres extra installs: "
        "pip install 'mxm-dataio-async[postgres]'"
    ) from exc

from mxm_dataio_async._store._postgres._metadata import PostgresMetadata
from mxm_dataio_async._store._postgres._schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "PostgresMetadata"]
