"""A second look at a job file that failed pydantic's shape check, so that one
``JobConfigError`` lists every problem at once.

The meaning checks (``compile_job``: unknown sources, undefined placeholders, dates out of
order, ...) need a validated ``JobConfig``. When the shape check fails (an unknown key, a bad
chunk), a copy of the data is *repaired* just enough to validate: an unknown key is dropped, an
optional key with a bad value falls back to its default, a bad date range becomes a stand-in
range (so ``{start}`` and ``{end}`` stay defined), a bad value in an expansion list is dropped,
and an entry that cannot be repaired (a request without ``kind``, a source without a usable
``adapter``) is replaced by a stand-in. The meaning checks then run on the repaired copy, and
their problems are kept unless they concern a repaired place (its problem is already
reported): so an undefined placeholder is reported together with the unknown key beside it,
not after it is fixed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Any, Final

from pydantic import ValidationError

from mxm_dataio_async.jobs._config import (
    JobConfig,
    PluginSource,
    RequestSpec,
    _model_at,
    key_path,
)
from mxm_dataio_async.jobs._dates import parse_chunk

__all__ = ["related", "repair"]

Loc = tuple[int | str, ...]

_ROUNDS: Final = 4
_STUB_DATE: Final = "2000-01-01"
_STUB_REQUEST: Final = {"source": "(left out)", "kind": "(left out)"}
_STUB_SOURCE: Final = {"adapter": "http"}
_EXPAND_TAGS: Final = ("range", "values")
_TEMPLATED: Final = ("endpoint", "params", "body", "as_of_bucket", "cache_tag")
_GONE: Final = object()  # a list item to drop once every fix of a round is placed


def _data_loc(raw: Loc) -> Loc:
    """A pydantic loc without the tags of discriminated unions (as ``pydantic_problem``)."""
    loc = list(raw)
    if len(loc) > 2 and loc[0] == "sources" and loc[2] in ("http", "file", "plugin"):
        del loc[2]
    if len(loc) > 4 and loc[0] == "requests" and loc[2] == "expand" and loc[4] in _EXPAND_TAGS:
        del loc[4]
    return tuple(loc)


def _get(data: Any, loc: Loc) -> Any:
    node = data
    for part in loc:
        found = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if not found:
            raise LookupError(loc)
        node = node[part]
    return node


def _set(data: Any, loc: Loc, value: Any) -> None:
    _get(data, loc[:-1])[loc[-1]] = value


def _drop(data: Any, loc: Loc) -> None:
    parent = _get(data, loc[:-1])
    if isinstance(parent, list):
        assert isinstance(loc[-1], int)
        parent[loc[-1]] = _GONE
    else:
        del parent[loc[-1]]


def _purge(node: Any) -> Any:
    if isinstance(node, list):
        return [_purge(v) for v in node if v is not _GONE]
    if isinstance(node, dict):
        return {k: _purge(v) for k, v in node.items()}
    return node


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | date) and value is not None


class _Repairs:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.places: list[Loc] = []  # data locs repaired (their problems are reported already)

    def fix(self, raw: Loc, kind: str) -> bool:
        """Repair the place of one pydantic error; False if the job cannot be repaired."""
        loc = _data_loc(raw)
        if not loc:
            return False
        try:
            if loc[0] == "requests" and len(loc) >= 2:
                self._request(loc, kind)
            elif loc[0] == "sources" and len(loc) >= 2:
                self._source(raw, loc, kind)
            else:
                return self._top(loc)
        except (LookupError, TypeError, AssertionError):
            pass  # an earlier fix of this round replaced the place: the next round tells
        return True

    def _mark(self, loc: Loc) -> None:
        self.places.append(loc)

    def unused(self) -> list[str]:
        """Where "never used" would only echo a repair: the expansions of a request whose
        endpoint, params, body, bucket or tag (the places that use them) lost a value."""
        out: list[str] = []
        for loc in self.places:
            if len(loc) >= 3 and loc[0] == "requests" and loc[2] in _TEMPLATED:
                entry = _get(self.data, loc[:2])
                expand = entry.get("expand") if isinstance(entry, dict) else None
                if isinstance(expand, dict):
                    out.extend(key_path((*loc[:2], "expand", str(key))) for key in expand)
        return out

    def _top(self, loc: Loc) -> bool:
        key = loc[0]
        if key in ("sources", "requests"):
            return False  # nothing to check the meaning of
        if key == "job":
            _set(self.data, loc[:1], "job")
        else:
            _drop(self.data, loc[:1])  # unknown, or optional with a default
        self._mark(loc[:1])
        return True

    def _request(self, loc: Loc, kind: str) -> None:
        entry = loc[:2]
        if len(loc) >= 4 and loc[2] == "expand":
            self._expansion(loc, kind)
            return
        if len(loc) == 3:
            known = RequestSpec.model_fields.get(str(loc[2]))
            if kind == "extra_forbidden" or (known is not None and not known.is_required()):
                _drop(self.data, loc)
                self._mark(loc)
                return
        elif len(loc) > 3 and loc[2] in ("params", "headers", "body"):
            _drop(self.data, loc)  # a value inside a free-form mapping
            self._mark(loc)
            return
        _set(self.data, entry, dict(_STUB_REQUEST))
        self._mark(entry)

    def _expansion(self, loc: Loc, kind: str) -> None:
        at = loc[:4]
        value = _get(self.data, at)
        if isinstance(value, dict):  # a date range
            if len(loc) == 5 and (kind == "extra_forbidden" or loc[4] == "chunk"):
                _drop(self.data, loc)
                self._mark(loc)
                return
            stand_in: dict[str, Any] = {"start": _STUB_DATE, "end": _STUB_DATE}
            with contextlib.suppress(ValueError):
                stand_in["chunk"] = str(parse_chunk(value.get("chunk", "1d")))
            _set(self.data, at, stand_in)
            self._mark(at)
            return
        if len(loc) == 5 and isinstance(value, list):  # one bad value of a list
            _drop(self.data, loc)
            self._mark(loc)
            return
        if _scalar(value) and not isinstance(value, list):
            _set(self.data, at, [value])  # a value where a list belongs
            self._mark(at)
            return
        _set(self.data, loc[:2], dict(_STUB_REQUEST))
        self._mark(loc[:2])

    def _source(self, raw: Loc, loc: Loc, kind: str) -> None:
        entry = loc[:2]
        if kind == "extra_forbidden" and len(loc) > 2:
            _drop(self.data, loc)
            self._mark(loc)
            return
        # Walk up from the bad value to the nearest key that may be left out, at most to the
        # source itself (then a stand-in takes its place).
        depth = len(raw)
        while depth > 3:
            parent, key = raw[: depth - 1], raw[depth - 1]
            model = PluginSource if parent[2:] == ("plugin",) else _model_at(parent)
            if model is None:
                if len(parent) != 3:
                    target = _data_loc(raw[:depth])
                    _drop(self.data, target)  # an item of a free-form list or mapping
                    self._mark(target)
                    return
            else:
                known = model.model_fields.get(str(key))
                if known is None or not known.is_required():
                    target = _data_loc(raw[:depth])
                    _drop(self.data, target)
                    self._mark(target)
                    return
            depth -= 1
        _set(self.data, entry, dict(_STUB_SOURCE))
        self._mark(entry)


def repair(
    data: dict[str, Any], error: ValidationError
) -> tuple[JobConfig | None, list[str], list[str]]:
    """A ``JobConfig`` from a repaired copy of ``data`` (None if it cannot be repaired), the key
    paths repaired (display form, as problems name them: leave out problems at or inside them),
    and the paths where an expansion's "never used" only echoes a repair (leave out those)."""
    repairs = _Repairs(copy.deepcopy(data))
    errors: Sequence[Any] = error.errors()
    for _ in range(_ROUNDS):
        for err in errors:
            if not repairs.fix(tuple(err["loc"]), err["type"]):
                return None, [], []
        repairs.data = _purge(repairs.data)
        try:
            config = JobConfig.model_validate(repairs.data)
        except ValidationError as again:
            errors = again.errors()
            continue
        return config, [key_path(place) for place in repairs.places], repairs.unused()
    return None, [], []


def related(path: str, places: Iterable[str], *, containing: bool = False) -> bool:
    """``path`` is one of ``places`` or inside one (with ``containing``, also one that holds
    one: a source's problem when its ``base_url`` was left unresolved)."""
    for place in places:
        if path == place or not place:
            return True
        pairs = ((place, path), (path, place)) if containing else ((place, path),)
        for outer, inner in pairs:
            if not outer or (inner.startswith(outer) and inner[len(outer)] in ".["):
                return True
    return False
