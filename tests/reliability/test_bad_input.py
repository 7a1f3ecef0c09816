"""Bad input: hostile params, bodies, headers, labels and source names.

Each input either works (a 64-hex identity; fetched through a MockAdapter-backed session it is
recorded, its stored params load back equal to the checked ones, and a second session replays it
from the store) or is refused quickly with a typed error (``TypeError``, ``ValueError``,
``DataIOError``): never another exception, never a hang. Nothing is written outside the store root.

Hypothesis runs derandomized (deterministic per test) and without an example database. Run with
``-s`` to see how many examples each fuzz test tried, accepted and refused.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import decimal
import enum
import json
import math
import os
import re
import sqlite3
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxm_dataio_async import (
    AdapterNotFound,
    AsyncSession,
    DataIOError,
    FetchError,
    FileAdapter,
    MockAdapter,
    Registry,
    Request,
    Store,
)
from mxm_dataio_async._identity import MAX_DEPTH, canonical_json, check_json
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async._request import build_request
from tests.reliability.conftest import RunIsolated

pytestmark = pytest.mark.anyio

TYPED: Final = (TypeError, ValueError, DataIOError)
HEX64: Final = re.compile(r"[0-9a-f]{64}")
SOURCE: Final = "fuzz"
BOUND: Final = 20.0  # seconds, against hangs only
REDACTION: Final = Redaction()

FUZZ = settings(
    database=None,
    derandomize=True,
    # Generous (an example takes milliseconds): "quickly", without flaking under load.
    deadline=dt.timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

STATS: dict[str, Counter[str]] = collections.defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def fuzz_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Print (and write as JSON) how many examples each fuzz test tried, accepted, refused."""
    yield
    if not STATS:
        return
    path = tmp_path_factory.getbasetemp() / "reliability-fuzz.json"
    path.write_text(json.dumps({k: dict(v) for k, v in STATS.items()}, indent=2, sort_keys=True))
    print()
    for name, counts in STATS.items():
        print(f"fuzz {name}: {dict(sorted(counts.items()))}")
    print(f"fuzz counts: {path}")


# -- hostile values --------------------------------------------------------------------------------


class Plain(enum.Enum):
    A = 1


class Number(enum.IntEnum):
    ONE = 1


class Word(enum.StrEnum):
    HELLO = "hello"


class Bits(enum.IntFlag):
    LOW = 1


class Sub(dict[str, Any]):
    pass


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


class Half(float):
    pass


# Unpaired only: a high surrogate followed by a low one is combined (see the pairs test).
LONE_SURROGATES: Final = ("\ud800", "\udfff", "a\udc80b", "\udfff\ud800")
# Names that look like paths, devices or escapes to something that would interpret them.
TRAVERSAL: Final = (
    "../../etc/passwd",
    "..",
    ".",
    "/",
    "/etc/passwd",
    "..\\..\\windows\\system32",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "payloads/../../escape",
    "dataio.sqlite",
    "CON",
    "nul",
    "~",
    "$HOME",
    "a/b/c",
)
ODD_TEXT: Final = (
    "",
    " ",
    "\t\r\n",
    "a\r\nX-Injected: 1",
    "\u202e\u200b\ufeff",
    "\U0001f600" * 3,
    "e\u0301",
    "\x7f\x1b[31m",
    "x" * 70_000,
)

safe_text = st.text(max_size=16) | st.sampled_from(TRAVERSAL + ODD_TEXT)
any_text = safe_text | st.sampled_from(LONE_SURROGATES) | st.text(st.characters(), max_size=8)
nul_text = st.builds(lambda a, b: f"{a}\x00{b}", st.text(max_size=4), st.text(max_size=4))

# Mapped from exponents: hypothesis cannot repr an int past 4300 digits (nor can json.dumps).
huge_ints = st.builds(
    lambda base, exp, sign: sign * (base**exp + 1),
    st.sampled_from([2, 10]),
    st.sampled_from([63, 64, 300, 4299, 5000]),
    st.sampled_from([1, -1]),
)
special_floats = st.sampled_from(
    [-0.0, 0.0, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, Half(0.5)]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats()
    | special_floats
    | any_text
    | st.sampled_from([Number.ONE, Word.HELLO, Bits.LOW])
)
not_json = st.sampled_from(
    [
        b"bytes",
        bytearray(b"ba"),
        memoryview(b"mv"),
        {1, 2},
        frozenset({"a"}),
        Opaque(),
        Plain.A,
        1 + 2j,
        decimal.Decimal("1.5"),
        dt.date(2025, 10, 27),
        Path("/etc/passwd"),
        range(3),
        type,
        print,
    ]
)
odd_keys: st.SearchStrategy[Any] = st.sampled_from(
    [1, None, True, 1.5, ("t",), b"k", Word.HELLO, frozenset()]
)


def _mappings(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    plain = st.dictionaries(any_text, children, max_size=4)
    return (
        plain
        | plain.map(Sub)
        | plain.map(collections.OrderedDict)
        | plain.map(types.MappingProxyType)
        | st.dictionaries(odd_keys, children, min_size=1, max_size=2)
    )


def _nest(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Three draws in four valid: enough requests get through to exercise the store too."""
    return st.integers(0, 3).flatmap(lambda n: hostile if n == 3 else valid)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints  # those past 4300 digits are refused (ValueError)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([-0.0, 5e-324, 1.7976931348623157e308, Half(0.5), Number.ONE, Word.HELLO])
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(any_text, children, max_size=4)
        | st.dictionaries(any_text, children, max_size=3).map(Sub)
    ),
    max_leaves=12,
)
values = st.recursive(
    scalars | not_json,
    lambda children: (
        st.lists(children, max_size=4) | st.tuples(children, children) | _mappings(children)
    ),
    max_leaves=12,
) | st.builds(_nest, st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3), scalars)

params_st = mostly(
    st.none() | st.dictionaries(any_text, json_values, max_size=6),
    _mappings(values) | st.sampled_from([[("a", 1)], "a=1", b"a=1", 42, {"a"}]),
)
safe_labels = any_text | st.just(None)
hostile_labels = mostly(
    safe_labels, nul_text | st.sampled_from([b"bytes", 1, 1.5, ["l"], Word.HELLO])
)
kinds = st.text(min_size=1, max_size=16) | st.sampled_from(TRAVERSAL + ODD_TEXT[1:])
headers_st = mostly(
    st.none() | st.dictionaries(any_text, any_text, max_size=3),
    st.dictionaries(safe_text, st.sampled_from([1, None, b"v", ["v"]]), min_size=1, max_size=2)
    | st.sampled_from([[("a", "b")], "a: b", {1: "v"}, {"Authorization": "Bearer SECRET"}]),
)
methods = mostly(
    st.sampled_from(["GET", "get", "PoSt", "PROPFIND", "delete"]),
    st.sampled_from(["", "G T", "G\x00T", "ΓΕΤ", "GET\n", None, 1, b"GET"]),
)
ttls = mostly(
    st.none() | st.floats(min_value=0) | st.integers(0, 10**9),
    st.floats() | st.integers(-5, -1) | st.sampled_from([True, "5", [1]]),
)
cache_modes = mostly(
    st.sampled_from(["default", "bypass", "never", "revalidate", "only_if_cached"]),
    st.sampled_from(["DEFAULT", "", None, 1, []]),
)


def request_kwargs(labels: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for ``session.request`` (kind first, positional)."""
    return st.fixed_dictionaries(
        {"kind": mostly(kinds, labels)},
        optional={
            "endpoint": labels,
            "params": params_st,
            "method": methods,
            "body": mostly(json_values, values),
            "headers": headers_st,
            "as_of_bucket": labels,
            "cache_tag": labels,
            "ttl": ttls,
        },
    )


def _has_lone_surrogate(value: object) -> bool:
    return isinstance(value, str) and any("\ud800" <= ch <= "\udfff" for ch in value)


def stored_params(root: Path, request_ids: list[str]) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(root / "dataio.sqlite")) as db:
        marks = ", ".join("?" for _ in request_ids)
        rows = db.execute(
            f"SELECT id, params, hex(hash) FROM requests WHERE id IN ({marks})", request_ids
        ).fetchall()
    return {rid: (json.loads(params), digest.lower()) for rid, params, digest in rows}


def expected_params(request: Request) -> dict[str, Any]:
    """What the store keeps: the checked params with secret values redacted."""
    return {
        k: ("[REDACTED]" if REDACTION.is_secret_param(k) else v) for k, v in request.params.items()
    }


def snapshot(parent: Path, inside: Path) -> set[str]:
    """Every path under ``parent`` except those under ``inside``."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(parent):
        here = Path(dirpath)
        if here == inside or inside in here.parents:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            path = here / name
            if path != inside:
                found.add(str(path.relative_to(parent)))
    return found


def echo_hash(request: Request) -> bytes:
    return request.hash.encode()


# -- request construction, no I/O ------------------------------------------------------------------


@settings(FUZZ, max_examples=600)
@given(kw=request_kwargs(hostile_labels), cache_mode=cache_modes, source=any_text)
def test_build_request_accepts_or_refuses_with_a_typed_error(
    kw: dict[str, Any], cache_mode: Any, source: str
) -> None:
    stats = STATS["build_request"]
    stats["examples"] += 1
    refusal: Exception | None = None
    try:
        request = build_request(session_id="s", source=source, cache_mode=cache_mode, **kw)
    except TYPED as exc:
        refusal = exc
    if refusal is not None:
        stats[f"refused {type(refusal).__name__}"] += 1
        assert str(refusal), "a refusal must say what was wrong"
        return
    stats["accepted"] += 1
    assert HEX64.fullmatch(request.hash)
    # Identity is deterministic, and what the request carries is exactly what was hashed.
    again = build_request(session_id="other", source=source, cache_mode=cache_mode, **kw)
    assert again.hash == request.hash
    if kw.get("params") is not None:
        assert request.params == check_json(kw["params"], "params")
    assert json.loads(json.dumps(request.params)) == request.params


@settings(FUZZ, max_examples=300)
@given(value=values)
def test_check_json_refuses_what_it_cannot_keep(value: Any) -> None:
    stats = STATS["check_json"]
    stats["examples"] += 1
    try:
        checked = check_json(value, "body")
        text = canonical_json(checked)  # ints past 4300 digits are refused only here
    except TYPED as exc:
        stats[f"refused {type(exc).__name__}"] += 1
        return
    stats["accepted"] += 1
    # Accepted values are plain JSON that survives its canonical text unchanged.
    assert json.loads(text) == checked


def test_nesting_at_and_beyond_max_depth() -> None:
    ok = build_request(session_id="s", source="s", kind="k", body=_nest(MAX_DEPTH, 1))
    assert HEX64.fullmatch(ok.hash)
    with pytest.raises(ValueError, match="nested deeper"):
        build_request(session_id="s", source="s", kind="k", body=_nest(MAX_DEPTH + 1, 1))
    # Far beyond: refused at the limit, long before Python's recursion limit.
    with pytest.raises(ValueError, match="nested deeper"):
        build_request(session_id="s", source="s", kind="k", body=_nest(100_000, 1))
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="nested deeper"):
        build_request(session_id="s", source="s", kind="k", params={"c": cycle})


# -- through a session: recorded and replayed ------------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(batch=st.lists(request_kwargs(mostly(safe_labels, nul_text)), min_size=1, max_size=6))
async def test_session_records_and_replays_what_it_accepts(
    batch: list[dict[str, Any]], tmp_path: Path
) -> None:
    stats = STATS["session_request"]
    stats["examples"] += 1
    root = tmp_path / "stores" / str(stats["examples"])
    before = snapshot(tmp_path, tmp_path / "stores")
    accepted: list[tuple[dict[str, Any], Request]] = []
    with anyio.fail_after(BOUND):
        async with Store(root) as store, Registry() as registry:
            registry.register(SOURCE, MockAdapter(echo_hash))
            async with AsyncSession(SOURCE, store=store, registry=registry) as s:
                for kw in batch:
                    stats["requests"] += 1
                    try:
                        request = s.request(**kw)
                    except TYPED as exc:
                        stats[f"refused {type(exc).__name__}"] += 1
                        continue
                    stats["accepted"] += 1
                    assert HEX64.fullmatch(request.hash)
                    response = await s.fetch(request)
                    assert response.ok
                    assert await s.read(response) == request.hash.encode()
                    accepted.append((kw, request))
            async with AsyncSession(
                SOURCE, store=store, registry=registry, cache_mode="only_if_cached"
            ) as replay:
                for kw, request in accepted:
                    again = replay.request(**{**kw, "ttl": None})
                    assert again.hash == request.hash
                    replayed = await replay.fetch(again)
                    assert replayed.from_cache
                    assert await replay.read(replayed) == request.hash.encode()
    if accepted:
        stored = stored_params(root, [r.id for _, r in accepted])
        for _, request in accepted:
            params, digest = stored[request.id]
            assert params == expected_params(request)
            assert digest == request.hash
    assert snapshot(tmp_path, tmp_path / "stores") == before


async def test_ten_megabyte_params_round_trip(tmp_path: Path) -> None:
    big = {"blob": "x" * 10_000_000, "unicode": "\u00e9\U0001f600" * 1000}
    root = tmp_path / "store"
    with anyio.fail_after(30):
        async with Store(root) as store, Registry() as registry:
            registry.register(SOURCE, MockAdapter(echo_hash))
            async with AsyncSession(SOURCE, store=store, registry=registry) as s:
                request = s.request("big", params=big, body={"also": "y" * 1_000_000})
                response = await s.fetch(request)
                assert await s.read(response) == request.hash.encode()
            async with AsyncSession(
                SOURCE, store=store, registry=registry, cache_mode="only_if_cached"
            ) as replay:
                replayed = await replay.fetch(replay.request("big", params=big, body=request.body))
                assert replayed.from_cache
    assert stored_params(root, [request.id])[request.id] == (big, request.hash)


# -- names that look like paths --------------------------------------------------------------------

HOSTILE_NAMES: Final = [
    "",
    "\x00",
    "a\x00b",
    " ",
    "../../etc/passwd",
    "..",
    "/",
    "/tmp/escape",
    "payloads",
    "dataio.sqlite",
    "dataio.sqlite-wal",
    "a/b",
    "..\\..\\x",
    "n" * 100_000,
    "\U0001f600",
    None,
    1,
    b"bytes",
    ("t",),
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n)[:20])
async def test_hostile_source_names_are_refused_or_harmless(name: Any, tmp_path: Path) -> None:
    root = tmp_path / "store"
    before = snapshot(tmp_path, root)
    registry = Registry()
    try:
        registry.register(name, MockAdapter(echo_hash))
    except TYPED:
        assert name not in registry
        with pytest.raises(AdapterNotFound):
            registry.entry("never registered")
        return
    assert name in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register(name, MockAdapter(echo_hash))
    with anyio.fail_after(BOUND):
        async with Store(root) as store:
            for mode in ("default", "only_if_cached"):
                async with AsyncSession(name, store=store, registry=registry, cache_mode=mode) as s:
                    request = s.request(
                        "../../kind", endpoint="../../etc/passwd", cache_tag="../..", params={}
                    )
                    response = await s.fetch(request)
                    assert await s.read(response) == request.hash.encode()
                    assert response.from_cache == (mode == "only_if_cached")
    assert snapshot(tmp_path, root) == before
    assert registry.unregister(name) is not None
    with pytest.raises(AdapterNotFound):
        registry.resolve_adapter(name)


# -- a file adapter under traversal ----------------------------------------------------------------

SEGMENTS: Final = ["..", ".", "", "in.txt", "link", "inbox", "outside", "secret.txt", "x" * 300]
# Most paths are junk; these put "in.txt" last often enough for some to be served.
paths = st.lists(st.sampled_from(SEGMENTS), max_size=5).map(lambda parts: [*parts, "in.txt"])


@settings(FUZZ, max_examples=150)
@given(
    parts=mostly(paths, st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6)),
    absolute=st.booleans(),
)
async def test_file_adapter_never_serves_outside_its_root(
    parts: list[str], absolute: bool, tmp_path: Path
) -> None:
    stats = STATS["file_adapter_paths"]
    stats["examples"] += 1
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    if not inbox.exists():
        inbox.mkdir()
        outside.mkdir()
        (inbox / "in.txt").write_bytes(b"inside")
        (outside / "secret.txt").write_bytes(b"SECRET")
        (inbox / "link").symlink_to(outside / "secret.txt")
    endpoint = "/".join(parts)
    if absolute:
        endpoint = f"{tmp_path}/{endpoint}"
    root = tmp_path / "stores" / str(stats["examples"])
    before = snapshot(tmp_path, tmp_path / "stores")
    with anyio.fail_after(BOUND):
        async with Store(root) as store, Registry() as registry:
            registry.register(SOURCE, FileAdapter(inbox))
            async with AsyncSession(SOURCE, store=store, registry=registry) as s:
                try:
                    response = await s.fetch(s.request("file", endpoint=endpoint))
                except FetchError:
                    stats["refused FetchError"] += 1
                else:
                    stats["served"] += 1
                    assert await s.read(response) == b"inside", endpoint
    assert snapshot(tmp_path, tmp_path / "stores") == before


# -- bugs ------------------------------------------------------------------------------------------


async def test_huge_ttl_is_a_typed_error(tmp_path: Path) -> None:
    registry = Registry()
    registry.register(SOURCE, MockAdapter(echo_hash))
    async with Store(tmp_path / "store") as store:
        async with AsyncSession(SOURCE, store=store, registry=registry) as s:
            with pytest.raises(TYPED):
                s.request("k", ttl=10**400)
        with pytest.raises(TYPED):
            AsyncSession(SOURCE, store=store, registry=registry, ttl=10**400)


_SURROGATE_SCRIPT = r"""
import os, sqlite3, sys, threading
from pathlib import Path

import anyio
import mxm_dataio_async as dio
from mxm_dataio_async.adapters.mock import MockAdapter

root = Path(sys.argv[1]) / "store"
variant = sys.argv[2]
BAD = "a\ud800b"
source = BAD if variant == "source" else "src"
kwargs = {
    "kind": {"kind": BAD},
    "endpoint": {"endpoint": BAD},
    "as_of_bucket": {"as_of_bucket": BAD},
    "cache_tag": {"cache_tag": BAD},
    "header_name": {"headers": {BAD: "v"}},
    "header_value": {"headers": {"X-A": BAD}},
    "source": {},
}[variant]
kind = kwargs.pop("kind", "k")


async def main():
    registry = dio.Registry()
    try:
        registry.register(source, MockAdapter(lambda r: b"ok"))
    except (TypeError, ValueError, dio.DataIOError):
        print("REFUSED register")
        return
    async with dio.Store(root) as store:
        try:
            session = dio.AsyncSession(source, store=store, registry=registry)
        except (TypeError, ValueError, dio.DataIOError):
            print("REFUSED session")
            return
        async with session as s:
            try:
                request = s.request(kind, **kwargs)
            except (TypeError, ValueError, dio.DataIOError):
                print("REFUSED request")
            else:
                resp = await s.fetch(request)
                print("FETCHED", await s.read(resp))
            session_id = s.session.id
    db = sqlite3.connect(root / "dataio.sqlite")
    status = db.execute("SELECT status FROM sessions WHERE id = ?", (session_id,)).fetchone()
    print("SESSION", status[0])


def hung():
    print("HUNG", flush=True)
    os._exit(3)


watchdog = threading.Timer(5.0, hung)
watchdog.daemon = True
watchdog.start()
anyio.run(main)
watchdog.cancel()
"""

SURROGATE_VARIANTS: Final = [
    "kind",
    "endpoint",
    "as_of_bucket",
    "cache_tag",
    "header_name",
    "header_value",
    "source",
]


async def test_lone_surrogates_in_labels_are_refused_or_stored(
    run_isolated: RunIsolated,
) -> None:
    """Labels, header names/values and source names with lone surrogates: before 9657c65 SQLite
    could not bind them, the UnicodeEncodeError killed the store's writer task and the session's
    shielded final write waited forever. In child processes, so a regression fails fast."""
    results = await run_isolated(_SURROGATE_SCRIPT, SURROGATE_VARIANTS, 30.0)
    for variant, result in results.items():
        assert not result.timed_out and result.returncode == 0, (variant, result)
        assert "REFUSED" in result.stdout or "SESSION ok" in result.stdout, (variant, result)


def test_surrogate_pairs_do_not_alias_the_character_they_encode() -> None:
    astral = build_request(session_id="s", source="s", kind="k", params={"s": "\U0001f600"})
    try:
        paired = build_request(session_id="s", source="s", kind="k", params={"s": "\ud83d\ude00"})
    except ValueError:
        return  # refused: fine
    # Regression: pairs are combined, so one identity means one value.
    assert paired.hash == astral.hash
    assert paired.params == astral.params
    # Whatever the identity, the checked params survive their own stored JSON.
    assert json.loads(json.dumps(paired.params)) == paired.params


def test_lone_surrogates_in_params_and_body_are_fine() -> None:
    """Params and body go through ASCII-escaped JSON everywhere: these must keep working."""
    for bad in LONE_SURROGATES:
        request = build_request(session_id="s", source="s", kind="k", params={bad: bad}, body=[bad])
        assert HEX64.fullmatch(request.hash)
        assert _has_lone_surrogate(next(iter(request.params)))


async def test_lone_surrogates_in_params_are_recorded(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with anyio.fail_after(BOUND):
        async with Store(root) as store, Registry() as registry:
            registry.register(SOURCE, MockAdapter(echo_hash))
            async with AsyncSession(SOURCE, store=store, registry=registry) as s:
                request = s.request("k", params={"\ud800": "a\udfffb"}, body={"b": "\udc80"})
                response = await s.fetch(request)
                assert await s.read(response) == request.hash.encode()
    assert stored_params(root, [request.id])[request.id] == (request.params, request.hash)
