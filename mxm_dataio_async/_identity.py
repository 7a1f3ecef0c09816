"""Canonical request identity.

A request's identity is the sha256 of a canonical JSON document: sorted keys, no whitespace, ASCII
only (so lone surrogates and any unicode encode the same way everywhere), NaN/Infinity rejected.
Only JSON's own types are accepted: ``dict`` with ``str`` keys, ``list``/``tuple`` (both are JSON
arrays), ``str``, ``int``, ``float``, ``bool`` and ``None``. Anything else is refused with a message
naming the offending path, because a silently coerced value (``{1: ...}`` becoming ``{"1": ...}``, a
set in arbitrary order) would give two different requests the same identity, or one request two.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import orjson
else:
    try:  # the `fast` extra: the same bytes, about ten times sooner (see fast_json)
        import orjson
    except ImportError:  # pragma: no cover - exercised only without the extra
        orjson = None

__all__ = [
    "MAX_DEPTH",
    "JSONValue",
    "ascii_json",
    "canonical_json",
    "check_json",
    "request_hash",
]

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]

#: Deepest nesting accepted in params and body (a guard against runaway recursion).
MAX_DEPTH = 200

# Ints this short always fit Python's int-to-text digit limit (default 4,300 digits); longer ones
# are checked exactly, since json.dumps would fail on them.
_SAFE_INT_BITS = 4096


def check_json(value: object, where: str = "value") -> JSONValue:
    """Validate ``value`` as canonical-JSON input and return it as plain JSON types.

    Tuples become lists and mappings become plain dicts, so what a request stores is exactly what
    its identity hashed. Raises ``TypeError`` for non-JSON types or non-string keys and
    ``ValueError`` for NaN/Infinity, ints too long to write, or nesting deeper than
    :data:`MAX_DEPTH`; the message names the path to the offending value.
    """
    try:
        return _check(value, 0)
    except _Refused as refused:
        path = where + "".join(f"[{step!r}]" for step in reversed(refused.path))
        raise refused.kind(f"{path}: {refused.message}") from None


class _Refused(Exception):
    """Raised deep inside ``_check``; each level adds its key on the way out, so the path string
    is built only when something is wrong (building it eagerly grows quadratically with depth)."""

    def __init__(self, kind: type[Exception], message: str) -> None:
        self.kind = kind
        self.message = message
        self.path: list[str | int] = []


def _text(value: str) -> str:
    """``value`` with surrogate pairs combined: ``"\\ud83d\\ude00"`` would otherwise be written to
    JSON exactly as the emoji it encodes, and the two would share one identity."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return value


def _check(value: object, depth: int) -> JSONValue:
    if depth > MAX_DEPTH:
        raise _Refused(ValueError, f"nested deeper than {MAX_DEPTH} levels")
    # Exact type checks first: the common case costs one lookup.
    cls = type(value)
    if cls is str:
        return _text(value)  # type: ignore[arg-type]
    if cls is bool or value is None:
        return value  # type: ignore[return-value]
    if cls is int:
        if value.bit_length() > _SAFE_INT_BITS:  # type: ignore[attr-defined]
            try:
                int.__repr__(value)
            except ValueError:
                raise _Refused(
                    ValueError,
                    "integer too long to serialise (over the interpreter's limit of "
                    f"{sys.get_int_max_str_digits()} digits); pass it as a string",
                ) from None
        return value  # type: ignore[return-value]
    if cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _Refused(
                ValueError, f"{value!r} is not valid JSON (NaN and Infinity are refused)"
            )
        return value  # type: ignore[return-value]
    if isinstance(value, Mapping):
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Refused(
                    TypeError,
                    f"key {key!r} is a {type(key).__name__}; JSON object keys must be str "
                    "(convert it explicitly, e.g. str(key))",
                )
            try:
                out[_text(key)] = _check(item, depth + 1)
            except _Refused as refused:
                refused.path.append(key)
                raise
        return out
    if isinstance(value, list | tuple):
        items: list[JSONValue] = []
        for i, item in enumerate(value):
            try:
                items.append(_check(item, depth + 1))
            except _Refused as refused:
                refused.path.append(i)
                raise
        return items
    if isinstance(value, set | frozenset):
        raise _Refused(TypeError, "sets have no order and are not JSON; pass a sorted list instead")
    if isinstance(value, bool | int | float | str):
        # Subclasses (IntEnum, StrEnum, numpy-free float subclasses): normalise to the base type.
        return _check(_base_type(value)(value), depth)
    raise _Refused(
        TypeError,
        f"{type(value).__name__} is not JSON-serialisable; use str, int, float, bool, None, "
        "list or dict with str keys",
    )


def _base_type(value: bool | int | float | str) -> type:
    """The JSON type a subclass instance is written as (apart from ``_check``: its generator
    would make ``_check`` build a closure cell on every call)."""
    return next(t for t in (bool, int, float, str) if isinstance(value, t))


# One encoder for every call: json.dumps with non-default options builds a new one each time.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def canonical_json(value: JSONValue) -> str:
    """Serialise already-checked JSON to its canonical text (sorted keys, compact, ASCII)."""
    fast = _orjson_text(value, orjson.OPT_SORT_KEYS) if orjson is not None else None
    return fast if fast is not None else _CANONICAL.encode(value)


# json_text's encoder: compact, ASCII, keys in their own order.
_ASCII = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def ascii_json(value: Any) -> str:
    """``value`` as compact ASCII JSON, keys in their order (the stores' JSON columns): any str,
    lone surrogates included, is representable, and its escapes load back to the same str."""
    fast = _orjson_text(value, 0) if orjson is not None else None
    return fast if fast is not None else _ASCII.encode(value)


def _orjson_text(value: Any, option: int) -> str | None:
    """orjson's text for ``value`` when it is exactly what the standard library writes, else
    ``None`` (the caller writes it then).

    The two agree on everything but floats (orjson writes ``1e-05`` as ``0.00001``), characters
    outside ASCII and DEL (which ``ensure_ascii`` escapes and orjson writes as they are), ints
    beyond 64 bits and lone surrogates (which orjson refuses): a document with a float is left
    to the standard library, and so is one whose orjson text is not plain printable ASCII.
    Property-tested against the standard library's output (``tests/test_identity.py``).
    """
    if _has_float(value, 0):
        return None
    try:
        raw = orjson.dumps(value, option=option)
    except (TypeError, orjson.JSONEncodeError):  # big ints, lone surrogates, other types
        return None
    if not raw.isascii() or b"\x7f" in raw:
        return None
    return raw.decode("ascii")


_PLAIN: Final = frozenset((str, int, bool, type(None)))


def _has_float(value: Any, depth: int) -> bool:
    """Whether ``value`` holds a float (or anything but str, int, bool, None, dict, list, tuple;
    or nests deeper than MAX_DEPTH): then the standard library writes it."""
    if depth > MAX_DEPTH:
        return True
    cls = type(value)
    if cls in _PLAIN:
        return False
    if cls is dict:
        items = value.values()
    elif cls is list or cls is tuple:
        items = value
    else:
        return True
    for item in items:  # noqa: SIM110 - a loop, not any(): no generator on the hot path
        if type(item) not in _PLAIN and _has_float(item, depth + 1):
            return True
    return False


def request_hash(
    *,
    source: str,
    kind: str,
    method: str,
    endpoint: str | None,
    params: JSONValue,
    body: JSONValue,
    as_of_bucket: str | None,
    cache_tag: str | None,
    byte_range: str | None = None,
) -> str:
    """The sha256 hex digest identifying a request (inputs must already be checked).

    ``byte_range``: the request's ``Range`` header, when it has one. A partial answer is an
    answer to that range only, so the range is part of the identity (absent, the digest is the
    same as before ranges were considered).
    """
    # The canonical JSON of {"as_of_bucket": .., "body": .., "cache_tag": .., "endpoint": ..,
    # "kind": .., "method": .., "params": .., ["range": ..,] "source": .., "v": 1}, written a
    # member at a time in its sorted key order (a member's text is the canonical JSON of its
    # value: the same bytes, property-tested; built without the dict, 2x sooner).
    text = (
        '{"as_of_bucket":'
        + _member(as_of_bucket)
        + ',"body":'
        + ("null" if body is None else canonical_json(body))
        + ',"cache_tag":'
        + _member(cache_tag)
        + ',"endpoint":'
        + _member(endpoint)
        + ',"kind":'
        + _member(kind)
        + ',"method":'
        + _member(method)
        + ',"params":'
        + ("{}" if not params and type(params) is dict else canonical_json(params))
        + ("" if byte_range is None else ',"range":' + _member(byte_range))
        + ',"source":'
        + _member(source)
        + ',"v":1}'
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _member(value: str | None) -> str:
    """A label's canonical JSON: plain printable ASCII is quoted as it is (what the encoder
    writes for it), anything else goes through the encoder."""
    if value is None:
        return "null"
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return canonical_json(value)
