"""``{name}`` placeholders in a request's endpoint, params, body, bucket and tag.

Syntax is Python's format strings restricted to plain names: ``{symbol}``, ``{start:%Y%m%d}``
(a format spec), ``{{`` and ``}}`` for literal braces. A string that is exactly one placeholder
without a spec keeps the value's type inside params and body (an int stays an int); dates always
become ISO text (``2024-01-31``) there, since JSON has no date type.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

__all__ = [
    "Template",
    "TemplateTree",
    "compile_template",
    "compile_text",
    "compile_tree",
    "render_value",
    "undefined_problem",
]

_FORMATTER = string.Formatter()


def render_value(value: object, spec: str = "") -> str:
    """A placeholder's value as text: dates as ISO, booleans as true/false, else ``format()``."""
    if not spec:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, str):
            return value
    return format(value, spec)


def _json_value(value: object) -> object:
    return value.isoformat() if isinstance(value, date) else value


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled string: literal text and ``(name, spec)`` placeholders."""

    text: str
    parts: tuple[tuple[str, str | None, str], ...]
    names: frozenset[str]
    whole: str | None  # the name, when the text is exactly "{name}"

    def render(self, values: Mapping[str, object]) -> str:
        if not self.names:
            return "".join(literal for literal, _, _ in self.parts)
        out: list[str] = []
        for literal, name, spec in self.parts:
            out.append(literal)
            if name is not None:
                out.append(render_value(values[name], spec))
        return "".join(out)


def compile_template(text: str) -> Template:
    """Parse ``text``; ``ValueError`` for bad syntax or a placeholder that is not a plain name."""
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise ValueError(f"{exc} in {text!r} (write {{{{ and }}}} for literal braces)") from None
    parts: list[tuple[str, str | None, str]] = []
    names: set[str] = set()
    for literal, name, spec, conversion in parsed:
        if name is None:
            parts.append((literal, None, ""))
            continue
        if not name.isidentifier():
            what = "an empty placeholder {}" if not name else f"placeholder {{{name}}}"
            raise ValueError(
                f"{what} in {text!r}: placeholders are plain names such as {{symbol}} "
                "(write {{ and }} for literal braces)"
            )
        if conversion is not None or (spec and "{" in spec):
            raise ValueError(
                f"placeholder {{{name}}} in {text!r}: only a format spec is allowed, "
                "e.g. {start:%Y%m%d}"
            )
        names.add(name)
        parts.append((literal, name, spec or ""))
    whole = None
    if len(parts) == 1 and not parts[0][0] and parts[0][1] is not None and not parts[0][2]:
        whole = parts[0][1]
    return Template(text, tuple(parts), frozenset(names), whole)


@dataclass(frozen=True, slots=True)
class TemplateTree:
    """A JSON-like value (params, body) whose strings may hold placeholders."""

    value: Any
    names: frozenset[str]

    def render(self, values: Mapping[str, object]) -> Any:
        if not self.names:
            return self.value
        return _render(self.value, values)


def _render(node: Any, values: Mapping[str, object]) -> Any:
    if isinstance(node, Template):
        if node.whole is not None:
            return _json_value(values[node.whole])
        return node.render(values)
    if isinstance(node, dict):
        return {k: _render(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, values) for v in node]
    return node


def undefined_problem(name: str, defined: frozenset[str]) -> str:
    text = f"undefined placeholder {{{name}}}: defined are {', '.join(sorted(defined))}"
    if name in ("start", "end"):
        text += (
            "; {start} and {end} come from a date range: expand: {dates: {start: ..., end: ...}}"
        )
    else:
        text += f"; add it under expand (e.g. {name}: [a, b]) or write {{{{ }}}} for literal braces"
    return text


Samples = Mapping[str, Sequence[object]]


def compile_text(
    text: str, where: str, samples: Samples, errors: list[tuple[str, str]]
) -> Template | None:
    """Compile one template string. ``samples`` maps each defined name to values it takes (to
    check format specs against); problems (syntax, undefined names, specs that do not fit) go to
    ``errors`` under ``where``."""
    try:
        tpl = compile_template(text)
    except ValueError as exc:
        errors.append((where, str(exc)))
        return None
    defined = frozenset(samples)
    errors.extend((where, undefined_problem(n, defined)) for n in sorted(tpl.names - defined))
    for _, name, spec in tpl.parts:
        if name is None or not spec or name not in samples:
            continue
        for value in samples[name]:
            try:
                render_value(value, spec)
            except (TypeError, ValueError) as exc:
                errors.append(
                    (
                        where,
                        f"format spec {{{name}:{spec}}} does not fit the value {value!r}: {exc}",
                    )
                )
                break
    return tpl


def compile_tree(
    value: Any, path: str, samples: Samples, errors: list[tuple[str, str]]
) -> TemplateTree:
    """Compile every string inside ``value`` (a JSON-like tree); problems go to ``errors``."""
    names: set[str] = set()

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, str):
            tpl = compile_text(node, where, samples, errors)
            if tpl is None:
                return node
            if not tpl.names:
                return tpl.render({})  # unescape {{ }}
            names.update(tpl.names)
            return tpl
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        return _json_value(node)

    compiled = walk(value, path)
    return TemplateTree(compiled, frozenset(names))
