from __future__ import annotations

import pytest

from mxm_dataio_async._recent import Recent


def test_keeps_between_one_and_two_generations_by_count() -> None:
    recent: Recent[int, str] = Recent(3)
    for i in range(7):
        recent.put(i, str(i))
    # 0,1,2 closed a generation, 3,4,5 closed the next (dropping 0,1,2); 6 is young.
    assert [i for i in range(7) if i in recent] == [3, 4, 5, 6]
    assert recent.get(3) == "3" and recent.get(6) == "6" and recent.get(0) is None
    assert len(recent) == 4


def test_newest_value_wins_across_generations() -> None:
    recent: Recent[str, int] = Recent(2)
    recent.put("a", 1)
    recent.put("b", 2)  # closes the generation: {"a": 1, "b": 2} is old now
    recent.put("a", 3)
    assert recent.get("a") == 3 and recent.get("b") == 2


def test_weight_closes_a_generation_and_bounds_memory() -> None:
    recent: Recent[int, bytes] = Recent(1000, max_weight=10, weigh=len)
    for i in range(20):
        recent.put(i, b"xxxx")  # 4 bytes each: a generation closes at its third entry
    kept = [i for i in range(20) if i in recent]
    assert kept == [15, 16, 17, 18, 19]
    assert sum(len(recent.get(i) or b"") for i in kept) <= 2 * 10 + 4


def test_an_entry_heavier_than_a_generation_is_not_kept() -> None:
    recent: Recent[str, bytes] = Recent(10, max_weight=8, weigh=len)
    recent.put("small", b"1234")
    recent.put("big", b"123456789")
    assert "big" not in recent and recent.get("small") == b"1234"


def test_clear() -> None:
    recent: Recent[str, int] = Recent(2)
    recent.put("a", 1)
    recent.put("b", 2)
    recent.put("c", 3)
    assert recent.get("b") == 2 and len(recent) == 3
    recent.clear()
    assert len(recent) == 0 and recent.get("b") is None


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Recent(0)
    with pytest.raises(ValueError, match="go together"):
        Recent(5, max_weight=10)
