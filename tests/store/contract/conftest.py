"""Fixtures of the storage contract suite: every test runs once per backend pair.

A backend pair is one :class:`MetadataStore` and one :class:`PayloadStore`, built by a factory in
``BACKENDS``. The tests use only the protocols (and the ``Store`` facade over them), so a new
implementation joins the suite by adding its factory to ``BACKENDS``; nothing else changes.

Fixtures:
- ``backend``: an open :class:`BackendPair` (``.metadata``, ``.payloads``), fresh and empty;
  ``metadata`` and ``payloads`` are its two halves.
- ``store``: an open ``Store(metadata=..., payloads=...)`` over a fresh pair of its own (use
  ``store.metadata`` / ``store.payloads`` to reach that pair; do not mix it with ``backend``).
- ``make_pair`` / ``make_store``: open more of them (a second store to import into, or another
  view of the same stored data with ``root=``); all are closed at teardown.
- ``clock``: the :class:`FakeClock` every backend is given (leases, ``created_at``, prune's now).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from mxm_dataio_async._clock import Clock, FakeClock
from mxm_dataio_async._store import LocalPayloads, SqliteMetadata, Store
from mxm_dataio_async._store._protocols import MetadataStore, PayloadStore
from tests.store.contract._helpers import INLINE_THRESHOLD, START


@dataclass(frozen=True, slots=True)
class BackendPair:
    """One metadata store and one payload store, meant to be used together.

    ``root`` is the scratch directory the pair was built for: a factory given the same root again
    returns another view of the same stored data (as a second process would open it).
    """

    metadata: MetadataStore
    payloads: PayloadStore
    root: Path
    lease_clock: str = "holder"
    """Whose clock decides lease expiry: ``holder`` (the ``clock`` given, a FakeClock in these
    tests) or ``server`` (the database's own ``now()``, which no test can move)."""


BackendFactory = Callable[[Path, Clock], BackendPair]


def make_sqlite_local(root: Path, clock: Clock) -> BackendPair:
    """SQLite metadata and local payload files, in separate folders: nothing may rely on the two
    sharing a directory (``Store("./data")`` happens to put them in one)."""
    return BackendPair(
        SqliteMetadata(root / "metadata", clock=clock),
        LocalPayloads(root / "objects"),
        root,
    )


def make_postgres_local(root: Path, clock: Clock) -> BackendPair:
    """PostgresMetadata in a schema of its own (named after ``root``, dropped after the test) in
    the test server's database, and local payload files; skipped without the service."""
    from tests.store.postgres._support import contract_metadata

    metadata = contract_metadata(root, clock)
    return BackendPair(metadata, LocalPayloads(root / "objects"), root, lease_clock="server")


def make_postgres_s3(root: Path, clock: Clock) -> BackendPair:
    """PostgresMetadata (a schema of its own) and S3Payloads (a key prefix of its own)."""
    from tests.store.postgres._support import contract_metadata

    s3 = make_sqlite_s3(root, clock).payloads
    return BackendPair(contract_metadata(root, clock), s3, root, lease_clock="server")


def make_sqlite_s3(root: Path, clock: Clock) -> BackendPair:
    """SQLite metadata and S3Payloads (SeaweedFS in CI) under a random key prefix per root,
    written to ``root/s3-prefix``: the same root opens the same objects again."""
    from mxm_dataio_async._store._s3 import S3Payloads
    from tests.conftest import service_url

    base = service_url("MXM_DATAIO_TEST_S3_URL", "S3").rstrip("/")
    marker = root / "s3-prefix"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"contract-{secrets.token_hex(8)}")
    return BackendPair(
        SqliteMetadata(root / "metadata", clock=clock),
        S3Payloads(f"{base}/{marker.read_text()}"),
        root,
    )


# The backend pairs the contract runs against, by test id. The factories of the pairs that need a
# server read its URL from the environment (tests.conftest.service_url: skipped without it, a
# failure in CI). Each call returns an empty store for a new ``root`` (a fresh schema / key
# prefix derived from it), and the same ``root`` gives the same stored data again.
BACKENDS: dict[str, BackendFactory] = {
    "sqlite-local": make_sqlite_local,
    "postgres-local": make_postgres_local,
    "sqlite-s3": make_sqlite_s3,  # SqliteMetadata + S3Payloads
    "postgres-s3": make_postgres_s3,
}


class PairMaker(Protocol):
    def __call__(self, *, root: Path | None = None, opened: bool = True) -> Awaitable[BackendPair]:
        """A pair of the backend under test: fresh unless ``root`` names an existing one's."""
        ...


class StoreMaker(Protocol):
    def __call__(
        self, *, root: Path | None = None, inline_threshold: int = INLINE_THRESHOLD
    ) -> Awaitable[Store]:
        """An open ``Store`` over a pair of the backend under test."""
        ...


@pytest.fixture(params=list(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def make_pair(
    backend_name: str, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[PairMaker]:
    factory = BACKENDS[backend_name]
    numbers = itertools.count()
    async with AsyncExitStack() as stack:

        async def make(*, root: Path | None = None, opened: bool = True) -> BackendPair:
            pair = factory(root if root is not None else tmp_path / f"pair{next(numbers)}", clock)
            # Closed at teardown whether or not the test closed it already (aclose is idempotent).
            stack.push_async_callback(pair.payloads.aclose)
            stack.push_async_callback(pair.metadata.aclose)
            if opened:
                # Metadata first: each half must be able to open on its own.
                await pair.metadata.open()
                await pair.payloads.open()
            return pair

        yield make


@pytest.fixture
async def backend(make_pair: PairMaker) -> BackendPair:
    return await make_pair()


@pytest.fixture
def metadata(backend: BackendPair) -> MetadataStore:
    return backend.metadata


@pytest.fixture
def payloads(backend: BackendPair) -> PayloadStore:
    return backend.payloads


@pytest.fixture
async def make_store(
    backend_name: str, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[StoreMaker]:
    factory = BACKENDS[backend_name]
    numbers = itertools.count()
    async with AsyncExitStack() as stack:

        async def make(
            *, root: Path | None = None, inline_threshold: int = INLINE_THRESHOLD
        ) -> Store:
            pair = factory(root if root is not None else tmp_path / f"store{next(numbers)}", clock)
            store = Store(
                metadata=pair.metadata,
                payloads=pair.payloads,
                inline_threshold=inline_threshold,
                clock=clock,
            )
            await stack.enter_async_context(store)
            return store

        yield make


@pytest.fixture
async def store(make_store: StoreMaker) -> Store:
    return await make_store()
