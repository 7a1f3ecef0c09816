"""Record modes and what each one does with a test's recording: pure decisions, no I/O.

The names and meanings follow pytest-recording (vcrpy's record modes):

| mode | an existing recording | a request it lacks | the recording afterwards |
|---|---|---|---|
| ``none`` | replayed | fails the test | unchanged |
| ``once`` | replayed (then as ``none``) | recorded only if there was no recording | written once |
| ``new_episodes`` | replayed | recorded | old and new |
| ``all`` | never replayed | recorded | old and new |
| ``rewrite`` | discarded | recorded | new only |
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Plan", "RecordMode", "plan"]


class RecordMode(StrEnum):
    NONE = "none"
    ONCE = "once"
    NEW_EPISODES = "new_episodes"
    ALL = "all"
    REWRITE = "rewrite"

    @classmethod
    def parse(cls, value: object) -> RecordMode:
        if isinstance(value, RecordMode):
            return value
        try:
            return cls(str(value).strip().lower().replace("-", "_"))
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown record mode {value!r}; use one of: {names}") from None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one test does with its recording."""

    mode: RecordMode
    load: bool  # import the existing recording into the test's store before it runs
    replay: bool  # answer adapter calls from the recording
    record: bool  # let adapter calls through to the real upstream (and keep what they return)
    save: bool  # write the recording when the test passes
    merge_old: bool  # what is written keeps the old recording's interactions

    @property
    def offline(self) -> bool:
        """Nothing may reach the upstream: the network is blocked."""
        return not self.record


def plan(mode: RecordMode, *, exists: bool) -> Plan:
    """The plan for a test in ``mode`` whose recording ``exists`` (or not)."""
    if mode is RecordMode.ONCE:
        mode_plan = plan(RecordMode.NONE if exists else RecordMode.REWRITE, exists=exists)
        return Plan(mode, mode_plan.load, mode_plan.replay, mode_plan.record, mode_plan.save, False)
    if mode is RecordMode.NONE:
        return Plan(mode, load=exists, replay=True, record=False, save=False, merge_old=False)
    if mode is RecordMode.NEW_EPISODES:
        return Plan(mode, load=exists, replay=True, record=True, save=True, merge_old=exists)
    if mode is RecordMode.ALL:
        return Plan(mode, load=False, replay=False, record=True, save=True, merge_old=exists)
    return Plan(mode, load=False, replay=False, record=True, save=True, merge_old=False)
