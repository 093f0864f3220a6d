"""RMT `null_tau` from the paired null of benign edits (pure: numpy/scipy, no I/O).

The RMT guard models a module's outlier excess Δ_m (subject − baseline, summed over the window
groups) as having variance τ²·(N_m + 1), N_m its normalised singular values within
`edge_band` of the Marchenko–Pastur edge (`invarlock.guards.rmt`). Each benign reference
run gives the larger of two scales: an upper 95% bound on τ from the mean square of its
modules (`rmt.null_scale`), and the smallest τ under which every one of its modules is
within its margin at the level of the reference false-alarm rate (`rmt.covering_scale`, at
α/M for M modules: the guard tests M modules and a few families, so its level is lower
and its margins no narrower). The second matters when one module moves far more than the
rest: a mean square averages such a module away. The shipped `null_tau` is the largest over
the runs, rounded up to 0.01 (at least 0.01), so the worst benign module of the worst
benign edit sizes every module's margin.

The per-module inputs (Δ_m, N_m) are what calibration commits, one row per module of each
benign run; `invarlock calibrate` and the tests compute τ from them with `null_tau`, so a
changed row changes the recomputed number.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from invarlock.guards import rmt

MODULE_COLUMNS = ("run", "module", "excess", "near_edge")
# τ is sized at the default (balanced) tier's per-run false-alarm rate. A tier with a higher
# rate (conservative, 0.05) is stricter than the null's worst module; one with a lower rate
# (aggressive, 0.001) looser.
REFERENCE_RATE = 0.01


@dataclass(frozen=True)
class NullTau:
    """τ per benign run (the larger of its two bounds), the largest, its run, and the shipped
    value."""

    per_run: dict[str, float]
    largest: float
    run: str
    tau: float            # `largest` rounded up to 0.01, at least 0.01


def module_rows(run: str, modules: Sequence[Mapping[str, Any]],
                band: float) -> list[dict[str, Any]]:
    """One row per RMT module of a run's certificate measurements: (run, module, Δ_m, N_m)."""
    moved, near = rmt.null_inputs(modules, band)
    return [{"run": run, "module": m["name"], "excess": float(d), "near_edge": int(n)}
            for m, d, n in zip(modules, moved, near, strict=True)]


def run_scale(moved: Sequence[float], near: Sequence[float]) -> float:
    """One benign run's τ: the larger of the mean-square bound and the covering scale."""
    if not len(moved):
        return 0.0
    return max(rmt.null_scale(moved, near),
               rmt.covering_scale(moved, near, REFERENCE_RATE / len(moved)))


def null_tau(rows: Sequence[Mapping[str, Any]]) -> NullTau:
    """τ from per-module rows of benign runs (`run`, `excess`, `near_edge`); the runs keep
    the order of their first row."""
    by_run: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        moved, near = by_run.setdefault(str(row["run"]), ([], []))
        moved.append(float(row["excess"]))
        near.append(float(row["near_edge"]))
    if not by_run:
        raise ValueError("null_tau needs the per-module rows of at least one benign run")
    per_run = {run: run_scale(moved, near) for run, (moved, near) in by_run.items()}
    worst = max(per_run, key=lambda run: per_run[run])
    largest = per_run[worst]
    # a null that moved nothing gives τ 0, which no margin can use (every crossing would
    # fail): the rounding step 0.01 is the floor
    return NullTau(per_run, largest, worst, max(math.ceil(largest * 100 - 1e-9) / 100, 0.01))


def parse_module_rows(text: str, where: str = "rmt-null-modules.csv") -> list[dict[str, Any]]:
    """The committed per-module CSV; a row whose excess or count is not a number is an error
    naming the line, so a garbled row cannot pass as data."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in MODULE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{where}: missing columns {', '.join(missing)}")
    rows = []
    for line, raw in enumerate(reader, start=2):
        try:
            excess, near = float(raw["excess"]), float(raw["near_edge"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}:{line}: excess and near_edge must be numbers") from None
        if not (math.isfinite(excess) and near >= 0 and near == int(near)):
            raise ValueError(f"{where}:{line}: excess must be finite and near_edge a count")
        rows.append({"run": raw["run"], "module": raw["module"], "excess": excess,
                     "near_edge": int(near)})
    return rows


def module_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-module rows as CSV text (the committed form)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(MODULE_COLUMNS), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
