"""The cache decision: a pure function of the mode, the stored response, the TTL and the time.

No I/O and no loop, so every rule is unit-testable in isolation (hishel's ``_core/_spec.py`` is the
model). The pipeline does the lookups and acts on the returned :class:`Decision`; every cache
decision is made here, including when a duplicate joins a fetch in flight instead of looking up.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

from mxm_dataio_async._models import CacheMode, Response

__all__ = [
    "Action",
    "Decision",
    "answers",
    "decide",
    "http_lifetime",
    "is_fresh",
    "joins_in_flight",
    "needs_lookup",
    "persists",
    "serves_stale",
]


class Action(StrEnum):
    SERVE = "serve"  # return the stored response; no adapter call, no rate budget
    FETCH = "fetch"  # call the adapter
    REVALIDATE = "revalidate"  # conditional call with the stored response's validators
    MISS = "miss"  # only_if_cached and nothing stored: CacheMiss


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    cached: Response | None
    reason: str


def joins_in_flight(mode: CacheMode, in_flight: bool) -> bool:
    """A duplicate of a fetch in flight joins it without a lookup of its own (default mode: the
    fetch in flight is at least as fresh as anything stored)."""
    return in_flight and mode is CacheMode.DEFAULT


def needs_lookup(mode: CacheMode, *, in_flight: bool = False) -> bool:
    """Whether to look at stored responses: not for bypass and never, nor for a default-mode
    duplicate that joins a fetch in flight."""
    if mode is CacheMode.BYPASS or mode is CacheMode.NEVER:
        return False
    return not joins_in_flight(mode, in_flight)


def persists(mode: CacheMode) -> bool:
    return mode is not CacheMode.NEVER


_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NEVER = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\s*(?:[=,]|$)", re.IGNORECASE)


def http_lifetime(response: Response) -> float | None:
    """How long ``response`` says it stays fresh, in seconds after it was fetched (RFC 9111, as a
    private cache): ``0`` for ``Cache-Control: no-cache`` or ``no-store``; else ``max-age``; else
    ``Expires`` (less ``Date``, or the fetch time); ``None`` when it says nothing. An ``Expires``
    that does not parse is already expired."""
    headers = {k.lower(): v for k, v in (response.headers or {}).items()}
    control = headers.get("cache-control")
    if control:
        if _NEVER.search(control):
            return 0.0
        found = _MAX_AGE.search(control)
        if found:
            return float(found.group(1))
    expires = headers.get("expires")
    if expires is None:
        return None
    try:
        until = parsedate_to_datetime(expires)
        since = parsedate_to_datetime(headers["date"]) if "date" in headers else None
    except (TypeError, ValueError, IndexError):
        return 0.0
    if until.tzinfo is None or (since is not None and since.tzinfo is None):
        return 0.0
    return max(0.0, (until - (since or response.fetched_at)).total_seconds())


def is_fresh(
    cached: Response, ttl: float | None, now: datetime, *, http_freshness: bool = False
) -> bool:
    """Fresh under ``ttl`` seconds (the request's TTL); ``None`` means fresh forever, or, with
    ``http_freshness``, for as long as the response's own headers say (:func:`http_lifetime`)."""
    if ttl is None:
        if not http_freshness:
            return True
        lifetime = http_lifetime(cached)
        if lifetime is None:
            return True
        return (now - cached.fetched_at).total_seconds() < lifetime
    return (now - cached.fetched_at).total_seconds() <= ttl


def serves_stale(
    cached: Response, allowance: float, now: datetime, headers: Mapping[str, str] | None
) -> bool:
    """Stale-if-error: whether ``cached`` (the newest stored OK response) may answer a request
    whose upstream failed, at most ``allowance`` seconds after it was fetched (``inf``: any age),
    and only if it answers the request's headers (``Vary``)."""
    if not cached.ok or not answers(cached, headers or {}):
        return False
    return (now - cached.fetched_at).total_seconds() <= allowance


def answers(cached: Response, headers: Mapping[str, str]) -> bool:
    """Whether a stored response answers a request that sends ``headers``: every request header
    its ``Vary`` names must have the value it was fetched with (``Vary: *`` never matches)."""
    vary = cached.vary
    if not vary:
        return True
    if "*" in vary:
        return False
    sent = {k.lower(): v for k, v in headers.items()} if headers else {}
    for name, digest in vary.items():
        value = sent.get(name, "")
        if hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest() != digest:
            return False
    return True


def decide(
    mode: CacheMode,
    cached: Response | None,
    *,
    ttl: float | None,
    now: datetime,
    in_flight: bool = False,
    headers: Mapping[str, str] | None = None,
    http_freshness: bool = False,
) -> Decision:
    """What to do for one fetch. ``cached`` is the newest stored OK response, if any;
    ``in_flight``: a fetch of the same request is running (see :func:`joins_in_flight`);
    ``headers``: the request's own, for a stored response's ``Vary`` (see :func:`answers`);
    ``http_freshness``: without a TTL, the response's own headers say how long it is fresh."""
    if joins_in_flight(mode, in_flight):
        return Decision(Action.FETCH, None, "joining an in-flight fetch")
    if cached is not None and cached.vary and not answers(cached, headers or {}):
        cached = None  # stored for other values of the headers it varies by: not an answer
    if mode is CacheMode.DEFAULT:
        if cached is None:
            return Decision(Action.FETCH, None, "not stored")
        if is_fresh(cached, ttl, now, http_freshness=http_freshness):
            return Decision(Action.SERVE, cached, "stored and fresh")
        if ttl is None:
            return Decision(Action.FETCH, cached, "stored but stale by its Cache-Control/Expires")
        return Decision(Action.FETCH, cached, "stored but older than the TTL")
    if mode is CacheMode.ONLY_IF_CACHED:
        if cached is None:
            return Decision(Action.MISS, None, "only_if_cached and not stored")
        return Decision(Action.SERVE, cached, "only_if_cached: stored (TTL ignored)")
    if mode is CacheMode.REVALIDATE:
        if cached is None:
            return Decision(Action.FETCH, None, "nothing stored to revalidate")
        return Decision(Action.REVALIDATE, cached, "revalidate the stored response")
    if mode is CacheMode.BYPASS:
        return Decision(Action.FETCH, None, "bypass")
    return Decision(Action.FETCH, None, "never: ephemeral fetch")
