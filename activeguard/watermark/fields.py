"""Typed fields of a journal entry: a journal is read from disk, so every field is checked, not trusted.

Each reader raises ``ValueError`` naming the field, so one ``except ValueError`` drops a malformed
entry. Limits match the database columns the entries end up in (a longer id would fail PostgreSQL).
"""

from __future__ import annotations

import math
from typing import Any

MAX_ID = 64  # model and license ids: VARCHAR(64) in the stores
MAX_TEXT = 256
MAX_INT = 2**63 - 1


def text(entry: dict[str, Any], key: str, limit: int = MAX_ID, *, required: bool = True) -> str:
    """A string field of at most ``limit`` characters (non-empty when ``required``)."""
    value = entry.get(key, None if required else "")
    if not isinstance(value, str) or len(value) > limit or (required and not value):
        raise ValueError(f"{key} is not a string of 1 to {limit} characters")
    return value


def integer(entry: dict[str, Any], key: str, low: int = 0, high: int = MAX_INT) -> int:
    """An integer field in [low, high] (JSON ``true`` is not an integer here)."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key} is not an integer in [{low}, {high}]")
    return value


def number(entry: dict[str, Any], key: str, low: float = -math.inf) -> float:
    """A finite number field, at least ``low`` (NaN and infinities, which JSON readers accept, are refused)."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise ValueError(f"{key} is not a finite number >= {low}")
    return float(value)


def counts(entry: dict[str, Any], key: str, max_keys: int = 64) -> dict[str, int]:
    """A ``{reason: count}`` field: short string keys, non-negative integer counts."""
    value = entry.get(key, {})
    if not isinstance(value, dict) or len(value) > max_keys:
        raise ValueError(f"{key} is not an object of at most {max_keys} counts")
    return {text({"reason": k}, "reason"): integer(value, k) for k in value}
