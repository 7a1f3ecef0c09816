"""The embedded SQLite metadata backend (``Store("./data")``)."""

from mxm_dataio_async._store._sqlite._metadata import SqliteMetadata
from mxm_dataio_async._store._sqlite._schema import DB_NAME, SCHEMA_VERSION

__all__ = ["DB_NAME", "SCHEMA_VERSION", "SqliteMetadata"]
