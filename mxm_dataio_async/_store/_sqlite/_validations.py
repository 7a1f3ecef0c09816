"""Validation outcomes (``validations`` table, schema v5): one row per (response, model)."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from mxm_dataio_async._store._sqlite._sql import transaction, ts
from mxm_dataio_async._store._validation import ValidationOutcome, ValidationTotals

__all__ = ["for_response", "save", "totals"]

_COLUMNS = "response_id, model, dataset, ok, failed, errors, validated_at"


def save(conn: sqlite3.Connection, outcome: ValidationOutcome, now: datetime) -> None:
    with transaction(conn, write=True):
        conn.execute(
            f"INSERT INTO validations ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (response_id, model) DO UPDATE SET dataset = excluded.dataset, "
            "ok = excluded.ok, failed = excluded.failed, errors = excluded.errors, "
            "validated_at = excluded.validated_at",
            (
                outcome.response_id,
                outcome.model,
                outcome.dataset,
                outcome.ok,
                outcome.failed,
                outcome.errors_json(),
                ts(outcome.validated_at or now),
            ),
        )


def for_response(conn: sqlite3.Connection, response_id: str) -> list[ValidationOutcome]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM validations WHERE response_id = ? ORDER BY model", (response_id,)
    ).fetchall()
    return [
        ValidationOutcome(
            response_id=r[0],
            model=r[1],
            dataset=r[2],
            ok=r[3],
            failed=r[4],
            errors=ValidationOutcome.errors_from_json(r[5]),
            validated_at=datetime.fromisoformat(r[6]),
        )
        for r in rows
    ]


def totals(conn: sqlite3.Connection) -> list[ValidationTotals]:
    rows = conn.execute(
        "SELECT model, count(*), sum(ok), sum(failed) FROM validations GROUP BY model "
        "ORDER BY model"
    ).fetchall()
    return [ValidationTotals(r[0], r[1], r[2], r[3]) for r in rows]
