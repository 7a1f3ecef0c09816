"""The validation outcome of one response's records, as every metadata store keeps it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["RecordError", "ValidationOutcome", "ValidationTotals"]


@dataclass(frozen=True, slots=True)
class RecordError:
    """One record that failed: its index in the payload, the field path, pydantic's message."""

    index: int
    path: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "message": self.message}


@dataclass(frozen=True, slots=True)
class ValidationOutcome:
    """How one response's records validated against ``model`` (``"pkg.module:Model"``).

    ``errors`` holds the first few failures (the validator's ``max_errors``); ``failed`` counts
    them all. Stored per (response, model): validating the same response again replaces it.
    """

    response_id: str
    model: str
    ok: int
    failed: int
    errors: tuple[RecordError, ...] = ()
    dataset: str | None = None
    validated_at: datetime | None = None

    def errors_json(self) -> str:
        return json.dumps([e.to_json() for e in self.errors], ensure_ascii=False)

    @staticmethod
    def errors_from_json(text: str | None) -> tuple[RecordError, ...]:
        if not text:
            return ()
        return tuple(
            RecordError(int(e["index"]), str(e["path"]), str(e["message"]))
            for e in json.loads(text)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "response_id": self.response_id,
            "model": self.model,
            "dataset": self.dataset,
            "ok": self.ok,
            "failed": self.failed,
            "errors": [e.to_json() for e in self.errors],
            "validated_at": None if self.validated_at is None else self.validated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class ValidationTotals:
    """Validation outcomes added up per model (``stats``)."""

    model: str
    responses: int
    ok: int
    failed: int
