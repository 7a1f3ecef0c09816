from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import date

import openpyxl
import pytest
from pydantic import BaseModel

from mxm_dataio_async.datasets import ParseSpec, Validator, parse_records


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def parse(data: bytes, size: int = 3, **spec: object) -> list[dict[str, object]]:
    return list(parse_records(chunked(data, size), ParseSpec(**spec)))  # type: ignore[arg-type]


def test_json_with_a_path_to_the_records() -> None:
    doc = {"data": {"items": [{"a": 1}, {"a": 2}]}, "meta": {}}
    raw = json.dumps(doc).encode()
    assert parse(raw, format="json", path="data.items") == [{"a": 1}, {"a": 2}]
    assert parse(raw, format="json", path="$.data.items.1") == [{"a": 2}]
    assert parse(b'[{"a": 1}]', format="json") == [{"a": 1}]
    assert parse(b'{"a": 1}', format="json") == [{"a": 1}]
    with pytest.raises(ValueError, match=r"nothing at 'data\.nope'"):
        parse(raw, format="json", path="data.nope")
    with pytest.raises(ValueError, match="not an object"):
        parse(b"[1]", format="json")


def test_ndjson_streams_across_chunk_boundaries() -> None:
    text = '{"name": "zürich"}\r\n\n{"name": "日本"}\n{"name": "last"}'
    for size in (1, 2, 5, 1000):  # multi-byte characters and CRLF split across chunks
        assert parse(text.encode(), size, format="ndjson") == [
            {"name": "zürich"},
            {"name": "日本"},
            {"name": "last"},
        ]
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        parse(b'{"a": 1}\n{oops\n', format="ndjson")


def test_ndjson_does_not_hold_the_payload() -> None:
    def endless() -> Iterator[bytes]:
        while True:
            yield b'{"x": 1}\n' * 1000

    records = parse_records(endless(), ParseSpec(format="ndjson"))
    assert [next(records) for _ in range(5)] == [{"x": 1}] * 5  # a lazy stream, not a load


def test_csv_dialects() -> None:
    raw = '\ufeffa;b;c\n1;"x;y";\n2;"say ""hi""";3\n'.encode()
    assert parse(raw, format="csv", delimiter=";") == [
        {"a": "1", "b": "x;y", "c": None},
        {"a": "2", "b": 'say "hi"', "c": "3"},
    ]
    latin = "title\nskip me\nname|city\nA|Genève\n".encode("latin-1")
    assert parse(latin, format="csv", delimiter="|", skip_rows=2, encoding="latin-1") == [
        {"name": "A", "city": "Genève"}
    ]
    with pytest.raises(ValueError, match="has 3 fields"):
        parse(b"a,b\n1,2,3\n", format="csv")
    assert parse(b"", format="csv") == []


def test_xlsx() -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Data"
    sheet.append(["report"])
    sheet.append(["day", "value"])
    sheet.append([date(2025, 1, 2), 1.5])
    sheet.append([None, None])
    sheet.append([date(2025, 1, 3), 2])
    buf = io.BytesIO()
    book.save(buf)
    got = parse(buf.getvalue(), 1000, format="xlsx", sheet="Data", header_row=2)
    assert [(r["day"].date(), r["value"]) for r in got] == [  # type: ignore[attr-defined]
        (date(2025, 1, 2), 1.5),
        (date(2025, 1, 3), 2),
    ]


def test_a_parser_of_your_own() -> None:
    def pipes(chunks: Iterator[bytes]) -> Iterator[dict[str, str]]:
        for line in b"".join(chunks).decode().splitlines():
            k, v = line.split("|")
            yield {"k": k, "v": v}

    assert parse(b"a|1\nb|2", parser=pipes) == [{"k": "a", "v": "1"}, {"k": "b", "v": "2"}]
    spec = ParseSpec(parser="tests.datasets.test_parse:_list_parser")
    assert list(parse_records([b"x"], spec)) == [{"n": 0}]
    with pytest.raises(ValueError, match="not both"):
        ParseSpec(format="csv", parser=pipes)
    with pytest.raises(ValueError, match="unknown format"):
        ParseSpec(format="yaml")  # type: ignore[arg-type]


def _list_parser(chunks: Iterator[bytes]) -> list[dict[str, int]]:
    return [{"n": 0}]


class Item(BaseModel):
    id: int
    price: float
    day: date


def test_validation_counts_and_keeps_the_first_errors() -> None:
    raw = b"id,price,day\n1,2.5,2025-01-02\nx,1,2025-01-02\n3,oops,nope\n4,1,2025-01-05\n"
    validator = Validator(Item, max_errors=2)
    tally = validator.tally()
    good = list(validator.validate(parse(raw, format="csv"), tally))
    assert [g["id"] for g in good] == [1, 4]
    assert good[0] == {"id": 1, "price": 2.5, "day": date(2025, 1, 2)}
    assert (tally.ok, tally.failed) == (2, 2)
    assert [(e.index, e.path) for e in tally.errors] == [(1, "id"), (2, "price")]
    assert Validator("tests.datasets.test_parse:Item").name == "tests.datasets.test_parse:Item"
    with pytest.raises(ValueError, match="not a pydantic model"):
        Validator("tests.datasets.test_parse:parse")
    with pytest.raises(ValueError, match="skip, fail or stop"):
        Validator(Item, on_error="ignore")  # type: ignore[arg-type]
