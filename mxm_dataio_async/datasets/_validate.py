"""Records into pydantic models, counting and keeping the failures (never dropping them quietly)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from mxm_dataio_async._exceptions import DataIOError
from mxm_dataio_async._store._validation import RecordError
from mxm_dataio_async.datasets._parse import import_object

__all__ = ["OnError", "RecordsInvalid", "Validator", "load_model", "model_name"]

OnError = Literal["skip", "fail", "stop"]
"""What a record that fails validation does: ``skip`` it (counted and recorded), ``fail`` the run
(nothing is published; fetching goes on), or ``stop`` the source (no more requests)."""


class RecordsInvalid(DataIOError, ValueError):
    """Records failed validation under ``on_error="fail"`` or ``"stop"``."""


def load_model(model: type[BaseModel] | str) -> type[BaseModel]:
    obj = import_object(model) if isinstance(model, str) else model
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ValueError(f"{model!r} is not a pydantic model class")
    return obj


def model_name(model: type[BaseModel]) -> str:
    return f"{model.__module__}:{model.__qualname__}"


@dataclass(slots=True)
class _Tally:
    ok: int = 0
    failed: int = 0
    errors: list[RecordError] = field(default_factory=list)


@dataclass(slots=True)
class Validator:
    """``Validator(Model)`` or ``Validator("pkg.module:Model", on_error="skip")``.

    ``validate(records)`` yields each valid record as a plain dict (``model_dump()``: the
    model's field names and converted values) and counts the others in ``tally``, keeping the
    first ``max_errors`` with their index and field path.
    """

    model: type[BaseModel]
    on_error: OnError = "skip"
    max_errors: int = 20

    def __init__(
        self, model: type[BaseModel] | str, on_error: OnError = "skip", max_errors: int = 20
    ) -> None:
        if on_error not in ("skip", "fail", "stop"):
            raise ValueError(f"on_error is skip, fail or stop, not {on_error!r}")
        self.model = load_model(model)
        self.on_error = on_error
        self.max_errors = max_errors

    @property
    def name(self) -> str:
        return model_name(self.model)

    def validate(
        self, records: Iterable[Mapping[str, Any]], tally: _Tally
    ) -> Iterator[dict[str, Any]]:
        validate = self.model.model_validate
        for index, record in enumerate(records):
            try:
                value = validate(record)
            except ValidationError as exc:
                tally.failed += 1
                for err in exc.errors(include_url=False):
                    if len(tally.errors) >= self.max_errors:
                        break
                    path = ".".join(str(p) for p in err["loc"])
                    tally.errors.append(RecordError(index, path, err["msg"]))
                continue
            tally.ok += 1
            yield value.model_dump()

    @staticmethod
    def tally() -> _Tally:
        return _Tally()
