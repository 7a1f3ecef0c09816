"""Models the job tests name as ``tests.datasets.models:Name``."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel


class Bar(BaseModel):
    symbol: str
    day: date
    close: float


class Item(BaseModel):
    item: str
