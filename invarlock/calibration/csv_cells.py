"""Cells of the committed calibration CSVs, read strictly: a garbled cell is an error that
names where it is, never a value that passes as data."""

from __future__ import annotations

import math


def flag(value: str, where: str) -> bool:
    """`True` or `False`, exactly as csv writes a bool."""
    if value not in ("True", "False"):
        raise ValueError(f"{where} must be True or False, got {value!r}")
    return value == "True"


def number(value: str, where: str) -> float | None:
    """A finite float; an empty cell is None (not measured)."""
    if value == "":
        return None
    try:
        parsed = float(value)
    except ValueError:
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(parsed):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return parsed
