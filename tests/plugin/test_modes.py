"""What each record mode does with a recording that exists or not (pure decisions)."""

from __future__ import annotations

import pytest

from mxm_dataio_async._pytest._modes import RecordMode, plan

# mode, exists -> load, replay, record, save, merge_old
TABLE = [
    ("none", False, (False, True, False, False, False)),
    ("none", True, (True, True, False, False, False)),
    ("once", False, (False, False, True, True, False)),
    ("once", True, (True, True, False, False, False)),
    ("new_episodes", False, (False, True, True, True, False)),
    ("new_episodes", True, (True, True, True, True, True)),
    ("all", True, (False, False, True, True, True)),
    ("rewrite", True, (False, False, True, True, False)),
]


@pytest.mark.parametrize(("mode", "exists", "expected"), TABLE)
def test_plan(mode: str, exists: bool, expected: tuple[bool, ...]) -> None:
    p = plan(RecordMode.parse(mode), exists=exists)
    assert (p.load, p.replay, p.record, p.save, p.merge_old) == expected
    assert p.offline is not p.record


def test_parse_accepts_dashes_and_refuses_unknown_modes() -> None:
    assert RecordMode.parse("New-Episodes") is RecordMode.NEW_EPISODES
    with pytest.raises(ValueError, match="unknown record mode 'sometimes'; use one of: none"):
        RecordMode.parse("sometimes")
