"""Validation outcomes (``validations`` table, schema v5): one row per (response, model)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mxm_dataio_async._store._postgres._sql import utc
from mxm_dataio_async._store._validation import ValidationOutcome, ValidationTotals

__all__ = ["for_response", "save", "totals"]

Connection = Any  # asyncpg.Connection

_COLUMNS = "response_id, model, dataset, ok, failed, errors, validated_at"


async def save(conn: Connection, outcome: ValidationOutcome, now: datetime) -> None:
    await conn.execute(
        f"INSERT INTO validations ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "ON CONFLICT (response_id, model) DO UPDATE SET dataset = excluded.dataset, "
        "ok = excluded.ok, failed = excluded.failed, errors = excluded.errors, "
        "validated_at = excluded.validated_at",
        outcome.response_id,
        outcome.model,
        outcome.dataset,
        outcome.ok,
        outcome.failed,
        outcome.errors_json(),
        utc(outcome.validated_at or now),
    )


async def for_response(conn: Connection, response_id: str) -> list[ValidationOutcome]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM validations WHERE response_id = $1 ORDER BY model", response_id
    )
    return [
        ValidationOutcome(
            response_id=r[0],
            model=r[1],
            dataset=r[2],
            ok=r[3],
            failed=r[4],
            errors=ValidationOutcome.errors_from_json(r[5]),
            validated_at=r[6],
        )
        for r in rows
    ]


async def totals(conn: Connection) -> list[ValidationTotals]:
    rows = await conn.fetch(
        "SELECT model, count(*), sum(ok), sum(failed) FROM validations GROUP BY model "
        "ORDER BY model"
    )
    return [ValidationTotals(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]
