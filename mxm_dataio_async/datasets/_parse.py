"""Records out of recorded bytes: JSON, NDJSON, CSV, XLSX, or a parser of your own.

Parsers take the payload as an iterator of byte chunks (``store.iter_payload`` gives them) and
yield one ``dict`` per record. NDJSON and CSV stream: memory holds one chunk and one record, so a
1 GiB payload parses in constant memory. A JSON document is one value and is read whole (then the
list at ``path`` is walked); XLSX is a zip and needs random access, so it is spooled to a
temporary file (on disk past 16 MiB) and read row by row with openpyxl's read-only mode.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FORMATS", "Format", "ParseSpec", "Parser", "import_object", "parse_records"]

Format = Literal["json", "ndjson", "csv", "xlsx"]
FORMATS: tuple[Format, ...] = ("json", "ndjson", "csv", "xlsx")

Parser = Callable[[Iterator[bytes]], Iterable[Mapping[str, Any]]]
"""A user parser: the payload's byte chunks in, records (mappings) out."""


@dataclass(frozen=True, slots=True)
class ParseSpec:
    """How to decode a payload into records.

    ``format``: ``json`` (``path`` is the dotted path to the list of records, e.g.
    ``"data.items"``; empty: the document itself, a list or one object), ``ndjson`` (one JSON
    object per line; blank lines skipped), ``csv`` (a header row; ``delimiter``, ``quotechar``,
    ``escapechar``, ``doublequote``, ``skip_rows`` before the header, ``encoding``; empty cells are
    ``None``), ``xlsx`` (``sheet`` name, default the first; ``header_row``, 1-based; the
    ``xlsx`` extra), or ``parser``: a callable (or ``"pkg.module:function"``) taking the byte
    chunks and returning records.
    """

    format: Format | None = None
    path: str = ""
    encoding: str = "utf-8"
    delimiter: str = ","
    quotechar: str = '"'
    escapechar: str | None = None
    doublequote: bool = True
    skip_rows: int = 0
    sheet: str | None = None
    header_row: int = 1
    parser: Parser | str | None = field(default=None)

    def __post_init__(self) -> None:
        if (self.format is None) == (self.parser is None):
            raise ValueError("give a format (json, ndjson, csv, xlsx) or a parser, not both")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; one of {', '.join(FORMATS)}")
        if self.header_row < 1 or self.skip_rows < 0:
            raise ValueError("header_row starts at 1 and skip_rows at 0")


def import_object(spec: str) -> Any:
    """``"pkg.module:name"`` -> the object (for models and parsers named in YAML)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expected 'pkg.module:Name', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"cannot import {module!r} (for {spec!r}): {exc}") from exc
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module!r} has no {name!r} (for {spec!r})") from None
    return obj


def parse_records(chunks: Iterable[bytes], spec: ParseSpec) -> Iterator[dict[str, Any]]:
    """The records of one payload, in order (a ``ValueError`` says where decoding failed)."""
    it = iter(chunks)
    if spec.parser is not None:
        parser = import_object(spec.parser) if isinstance(spec.parser, str) else spec.parser
        for i, rec in enumerate(parser(it)):
            if not isinstance(rec, Mapping):
                raise ValueError(f"the parser gave record {i} as {type(rec).__name__}, not a dict")
            yield dict(rec)
        return
    if spec.format == "json":
        yield from _json(it, spec)
    elif spec.format == "ndjson":
        yield from _ndjson(it, spec)
    elif spec.format == "csv":
        yield from _csv(it, spec)
    else:
        yield from _xlsx(it, spec)


def _lines(chunks: Iterator[bytes], encoding: str) -> Iterator[str]:
    """Text lines (with their ends) decoded incrementally: a chunk may end mid-character."""
    decoder = codecs.getincrementaldecoder(encoding)()
    rest = ""
    first = True
    for chunk in chunks:
        text = rest + decoder.decode(chunk)
        if first and text:
            text = text.removeprefix("\ufeff")  # a BOM is not part of the first field
            first = False
        lines = text.splitlines(keepends=True)
        rest = lines.pop() if lines and not lines[-1].endswith(("\n", "\r")) else ""
        # "\r\n" split across chunks: keep a trailing "\r" until the next chunk decides.
        if lines and lines[-1].endswith("\r") and not rest:
            rest = lines.pop()
        yield from lines
    tail = rest + decoder.decode(b"", final=True)
    if tail:
        yield tail


def _json(chunks: Iterator[bytes], spec: ParseSpec) -> Iterator[dict[str, Any]]:
    doc = json.loads(b"".join(chunks).decode(spec.encoding))
    at: Any = doc
    for part in (p for p in spec.path.removeprefix("$").strip(".").split(".") if p):
        if isinstance(at, list) and part.lstrip("-").isdigit():
            at = at[int(part)]
        elif isinstance(at, dict) and part in at:
            at = at[part]
        else:
            raise ValueError(f"the JSON document has nothing at {spec.path!r} (no {part!r})")
    items = at if isinstance(at, list) else [at]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"record {i} at {spec.path or '(root)'!r} is not an object")
        yield item


def _ndjson(chunks: Iterator[bytes], spec: ParseSpec) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(_lines(chunks, spec.encoding), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {n} is not JSON: {exc}") from None
        if not isinstance(item, dict):
            raise ValueError(f"line {n} is not a JSON object")
        yield item


def _csv(chunks: Iterator[bytes], spec: ParseSpec) -> Iterator[dict[str, Any]]:
    lines = _lines(chunks, spec.encoding)
    for _ in range(spec.skip_rows):
        next(lines, None)
    reader = csv.reader(
        lines,
        delimiter=spec.delimiter,
        quotechar=spec.quotechar,
        escapechar=spec.escapechar,
        doublequote=spec.doublequote,
    )
    header = next(reader, None)
    if header is None:
        return
    width = len(header)
    for row in reader:
        if not row:
            continue
        if len(row) != width:
            raise ValueError(
                f"CSV line {reader.line_num + spec.skip_rows} has {len(row)} fields; "
                f"the header has {width}"
            )
        yield {k: (v if v != "" else None) for k, v in zip(header, row, strict=True)}


def _xlsx(chunks: Iterator[bytes], spec: ParseSpec) -> Iterator[dict[str, Any]]:
    try:
        import openpyxl
    except ImportError as exc:
        raise ImportError(
            "parsing XLSX needs openpyxl, which comes with the xlsx extra: "
            "pip install 'mxm-dataio-async[xlsx]'"
        ) from exc
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        book = openpyxl.load_workbook(spool, read_only=True, data_only=True)
        try:
            sheet = book[spec.sheet] if spec.sheet is not None else book.worksheets[0]
            rows = sheet.iter_rows(min_row=spec.header_row, values_only=True)
            header = next(rows, None)
            if header is None:
                return
            names = [str(h) if h is not None else f"column_{i}" for i, h in enumerate(header)]
            for row in rows:
                if all(v is None for v in row):
                    continue
                yield dict(zip(names, row, strict=False))
        finally:
            book.close()
