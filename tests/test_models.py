from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import MISSING, FrozenInstanceError, fields
from typing import Any

import pytest

from mxm_dataio_async._models import (
    AdapterResult,
    Request,
    Response,
    make_adapter_result,
    make_request,
    make_response,
    new_id,
    served_from_cache,
)


def test_ids_are_uuid7_text_unique_and_time_ordered() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(5_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
        assert before <= parsed.int >> 80 <= after  # the first 48 bits: Unix time in ms
    # Later ids never sort before earlier ones across a millisecond boundary.
    stamps = [uuid.UUID(text).int >> 80 for text in ids]
    assert stamps == sorted(stamps)


def test_id_random_bits_vary_within_one_millisecond() -> None:
    ids = [uuid.UUID(new_id()) for _ in range(2_000)]
    # Everything after the timestamp, version and variant: 74 random bits per id.
    random_bits = {(u.int >> 64 & 0xFFF, u.int & ((1 << 62) - 1)) for u in ids}
    assert len(random_bits) == len(ids)
    low_bits = [u.int & 1 for u in ids]
    assert 700 < sum(low_bits) < 1300  # a fair coin, far from a stuck bit
    # The variant digit carries two random bits: all four of its values turn up.
    assert {str(u)[19] for u in ids} == set("89ab")


_FORK_SCRIPT = """
import os
from mxm_dataio_async._models import new_id

new_id()  # the parent's pool now holds ids it has not handed out yet
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, " ".join(new_id() for _ in range(50)).encode())
    os._exit(0)
os.close(write)
os.waitpid(pid, 0)
with os.fdopen(read) as f:
    child = set(f.read().split())
parent = {new_id() for _ in range(50)}
print(len(child), len(child & parent))
"""


def test_a_forked_child_does_not_reuse_the_parents_ids() -> None:
    # In a fresh interpreter: forking this (threaded) test process is unsafe and warns on 3.12+.
    out = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["50", "0"]


def test_session_ids_are_random_uuid4_so_short_prefixes_stay_unique() -> None:
    from mxm_dataio_async._models import new_session_id

    ids = [new_session_id() for _ in range(2_000)]
    assert all(uuid.UUID(text).version == 4 for text in ids)
    assert len({text[:8] for text in ids}) > 1_990  # 32 random bits: collisions are rare


def _distinct_values(cls: type) -> dict[str, Any]:
    """A distinct value for every field of ``cls``: none equal to its default or to another."""
    return {f.name: ("value", i) for i, f in enumerate(fields(cls))}


def test_quick_constructors_build_the_same_objects() -> None:
    makers: list[tuple[type, Callable[..., Any]]] = [
        (Response, make_response),
        (Request, make_request),
        (AdapterResult, make_adapter_result),
    ]
    for cls, make in makers:
        values = _distinct_values(cls)
        names = [f.name for f in fields(cls)]
        built = cls(**values)
        positional = make(*(values[n] for n in names))
        by_name = make(**values)
        for quick in (positional, by_name):
            assert type(quick) is cls
            assert all(getattr(quick, n) == getattr(built, n) for n in names), cls
            assert repr(quick) == repr(built)
        # Defaults as the class has them: only the fields without one given.
        required = {f.name: values[f.name] for f in fields(cls) if f.default is MISSING}
        assert make(**required) == cls(**required)
        with pytest.raises(TypeError):
            make()
        with pytest.raises(FrozenInstanceError):  # frozen like the class's own
            setattr(positional, names[0], "other")
    response: Response = make_response(**_distinct_values(Response))
    served = served_from_cache(response)
    assert served.from_cache is True and served is not response
    assert all(
        getattr(served, f.name) == getattr(response, f.name)
        for f in fields(Response)
        if f.name != "from_cache"
    )
