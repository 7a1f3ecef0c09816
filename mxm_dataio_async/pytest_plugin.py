"""pytest plugin: record a test's real interactions once, replay them offline, on the audit store.

Installed with the package (entry point ``pytest11``; no dependency beyond pytest). A test asks
for ``dataio_store``, an open :class:`~mxm_dataio_async.Store` holding the test's recording
(``<test dir>/recordings/<module>/<test>/``: a text manifest, the audit rows as JSON lines and
the payloads as plain files), and passes it to its sessions::

    @pytest.mark.anyio
    async def test_quote(dataio_store):
        async with dio.AsyncSession("prices", store=dataio_store, registry=registry) as s:
            resp = await s.fetch(s.request("quote", endpoint="/quote", params={"s": "CSPX.L"}))

``--dataio-record-mode`` (or ``@pytest.mark.dataio(record_mode=...)``): ``none`` (the default:
replay only; a request not recorded fails the test, naming it), ``once``, ``new_episodes``,
``all``, ``rewrite``, as in pytest-recording. Replays match requests by identity
(``Request.hash``), so concurrency and repeats replay as recorded. While a test replays, the
network is blocked (``--dataio-allowed-hosts`` lets hosts through); ``--dataio-block-network``
blocks it in every test that does not record. A recording never holds a secret: the sessions'
redaction applies, ``@pytest.mark.dataio(redact_headers=..., redact_params=...)`` adds names,
and a value listed in ``secrets=`` or named by ``--dataio-secret-env`` fails the test instead
of being written.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import re
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

from mxm_dataio_async._public import claim as _claim
from mxm_dataio_async._pytest._modes import Plan, RecordMode, plan
from mxm_dataio_async._pytest._network import NetworkBlocked, blocking_network, parse_hosts
from mxm_dataio_async._pytest._recording import RecordingDir, SecretInRecording
from mxm_dataio_async._pytest._replay import NotRecorded, Replayer, replaying

if TYPE_CHECKING:
    from mxm_dataio_async._store import Store

__all__ = [
    "NetworkBlocked",
    "NotRecorded",
    "RecordMode",
    "RecordingInfo",
    "SecretInRecording",
    "dataio_recording",
    "dataio_store",
]

_MARKER: Final = "dataio"
_PASSED = pytest.StashKey[bool]()
_INFO = pytest.StashKey["RecordingInfo"]()
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\s]+')


@dataclass(frozen=True, slots=True)
class RecordingInfo:
    """Where a test's recording is and what this run does with it (``dataio_recording``)."""

    path: Path
    mode: RecordMode
    plan: Plan
    secrets: tuple[str, ...]
    redact_headers: tuple[str, ...]
    redact_params: tuple[str, ...]
    allowed_hosts: tuple[str, ...]

    @property
    def replaying(self) -> bool:
        """Nothing reaches the upstream in this run (``none``, or ``once`` with a recording)."""
        return self.plan.offline

    @property
    def recording(self) -> bool:
        """Interactions not in the recording go to the upstream and are recorded."""
        return self.plan.record


# -- configuration -------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mxm-dataio", "mxm-dataio recorded interactions")
    modes = [m.value for m in RecordMode]
    group.addoption(
        "--dataio-record-mode",
        dest="dataio_record_mode",
        default=None,
        choices=modes,
        help="what tests using dataio_store do with their recordings: none (default: replay "
        "only), once, new_episodes, all, rewrite",
    )
    group.addoption(
        "--dataio-block-network",
        dest="dataio_block_network",
        action="store_true",
        default=None,
        help="block network access in every test that does not record (replaying tests "
        "always block it)",
    )
    group.addoption(
        "--dataio-allowed-hosts",
        dest="dataio_allowed_hosts",
        action="append",
        default=[],
        help="hosts (names or addresses, comma-separated) reachable while the network is blocked",
    )
    group.addoption(
        "--dataio-secret-env",
        dest="dataio_secret_env",
        action="append",
        default=[],
        help="an environment variable whose value must never be written to a recording "
        "(repeatable)",
    )
    parser.addini("dataio_record_mode", "default --dataio-record-mode", default="none")
    parser.addini("dataio_block_network", "default --dataio-block-network", type="bool")
    parser.addini("dataio_allowed_hosts", "hosts reachable while blocked", type="args")
    parser.addini("dataio_secret_env", "variables whose values are secrets", type="args")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "dataio(record_mode=None, recording=None, secrets=(), redact_headers=(), "
        "redact_params=(), allowed_hosts=()): a test's mxm-dataio recording: its record mode, "
        "its folder (relative to the module's), secret values it must never hold, extra header "
        "and parameter names to redact, hosts reachable while the network is blocked",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


def _marker_values(item: pytest.Item, name: str) -> tuple[str, ...]:
    out: list[str] = []
    for mark in item.iter_markers(_MARKER):
        value = mark.kwargs.get(name, ())
        out.extend([value] if isinstance(value, str) else [str(v) for v in value])
    return tuple(out)


def _info(item: pytest.Item) -> RecordingInfo:
    """The test's recording and plan, worked out once per test."""
    found = item.stash.get(_INFO, None)
    if found is not None:
        return found
    config = item.config
    mark = item.get_closest_marker(_MARKER)
    chosen = mark.kwargs.get("record_mode") if mark is not None else None
    if chosen is None:
        chosen = config.getoption("dataio_record_mode") or config.getini("dataio_record_mode")
    mode = RecordMode.parse(chosen)
    path = _recording_path(item, mark.kwargs.get("recording") if mark is not None else None)
    env_names = [*config.getoption("dataio_secret_env"), *config.getini("dataio_secret_env")]
    secrets = tuple(v for n in env_names if (v := os.environ.get(n)))
    hosts = parse_hosts(
        [*config.getoption("dataio_allowed_hosts"), *config.getini("dataio_allowed_hosts")]
    )
    info = RecordingInfo(
        path=path,
        mode=mode,
        plan=plan(mode, exists=RecordingDir(path).exists()),
        secrets=secrets + _marker_values(item, "secrets"),
        redact_headers=_marker_values(item, "redact_headers"),
        redact_params=_marker_values(item, "redact_params"),
        allowed_hosts=hosts + parse_hosts(_marker_values(item, "allowed_hosts")),
    )
    item.stash[_INFO] = info
    return info


def _recording_path(item: pytest.Item, name: object) -> Path:
    """``<test dir>/recordings/<module>/<test>``: classes and parameters in the name."""
    module = Path(str(item.path))
    base = module.parent / "recordings" / module.stem
    if name is not None:
        return base / str(name)
    test = item.nodeid.split("::", 1)[-1].replace("::", ".")
    return base / (_UNSAFE.sub("_", test) or "test")


def _how_to_record(item: pytest.Item, info: RecordingInfo) -> str:
    mode = "new_episodes" if RecordingDir(info.path).exists() else "once"
    return f"Record it from the real upstream: pytest --dataio-record-mode={mode} '{item.nodeid}'"


# -- the network ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _dataio_network(request: pytest.FixtureRequest) -> Iterator[None]:
    """Blocks the network in a replaying test (one that uses ``dataio_store``), and with
    ``--dataio-block-network`` in every test that does not record."""
    config = request.config
    block_all = bool(
        config.getoption("dataio_block_network") or config.getini("dataio_block_network")
    )
    uses_store = "dataio_store" in request.fixturenames
    if not (uses_store or block_all):
        yield
        return
    info = _info(request.node)
    if uses_store and info.plan.record:
        yield  # recording: the upstream must be reachable
        return
    why = f"{request.node.nodeid}, record mode {info.mode.value}"
    with blocking_network(info.allowed_hosts, why):
        yield


# -- the store -----------------------------------------------------------------------------------


@pytest.fixture
def dataio_recording(request: pytest.FixtureRequest) -> RecordingInfo:
    """Where this test's recording is and whether this run replays or records it (e.g. to start
    a local upstream only when recording)."""
    return _info(request.node)


@pytest.fixture
def dataio_store(request: pytest.FixtureRequest) -> Store:
    """An open ``Store`` holding this test's recording, for its sessions (``store=``).

    Replaying, it serves what was recorded (by request identity) and nothing else; recording,
    it keeps what the upstream answers and writes it to the recording when the test passes.
    An async resource: the test runs under anyio (``@pytest.mark.anyio``) or pytest-asyncio.
    """
    name = "_dataio_store_anyio" if "anyio_backend" in request.fixturenames else None
    if name is None and _ASYNCIO_FIXTURE is not None:
        name = "_dataio_store_asyncio"
    if name is not None:
        store: Store = request.getfixturevalue(name)
        return store
    raise pytest.UsageError(
        f"{request.node.nodeid}: dataio_store opens a Store in the test's event loop; mark the "
        "test @pytest.mark.anyio (or run it under pytest-asyncio)"
    )


@asynccontextmanager
async def _store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Store]:
    from mxm_dataio_async._redact import Redaction
    from mxm_dataio_async._store import Store

    item = request.node
    info = _info(item)
    recording = RecordingDir(info.path)
    work = tmp_path_factory.mktemp("dataio-store", numbered=True)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(Store(work))
        if info.plan.load:
            await recording.load_into(store)
        if info.plan.replay:
            replayer = Replayer(
                store,
                recording,
                passthrough=info.plan.record,
                hint=_how_to_record(item, info),
            )
            store.stand_in = replaying(replayer, offline=info.plan.offline)
        yield store
    if info.plan.save and item.stash.get(_PASSED, False):
        extra = None
        if info.redact_headers or info.redact_params:
            extra = Redaction.extend(info.redact_headers, info.redact_params, replace=True)
        async with Store(work) as store:  # reopened: every queued row committed
            await recording.save_from(
                store,
                test=item.nodeid,
                secrets=info.secrets,
                redaction=extra,
                merge_old=info.plan.merge_old,
            )


@pytest.fixture
async def _dataio_store_anyio(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Store]:
    async with _store(request, tmp_path_factory) as store:
        yield store


def _asyncio_fixture() -> Any:
    """pytest-asyncio's fixture decorator, where it is installed."""
    if importlib.util.find_spec("pytest_asyncio") is None:
        return None
    return importlib.import_module("pytest_asyncio").fixture


_ASYNCIO_FIXTURE: Final = _asyncio_fixture()

if _ASYNCIO_FIXTURE is not None:

    @_ASYNCIO_FIXTURE  # type: ignore[untyped-decorator]
    async def _dataio_store_asyncio(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> AsyncIterator[Store]:
        # pytest-asyncio sets a fixture up and tears it down in two different tasks, and the
        # store's task group must be left in the task that entered it: one task of its own
        # holds the store open from setup to teardown.
        opened: asyncio.Future[Store] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def hold() -> None:
            try:
                async with _store(request, tmp_path_factory) as store:
                    opened.set_result(store)
                    await done.wait()
            except BaseException as exc:
                if not opened.done():
                    opened.set_exception(exc)
                raise

        holder = asyncio.get_running_loop().create_task(hold())
        try:
            yield await opened
        finally:
            done.set()
            await holder


_claim(__name__, __all__, globals())
