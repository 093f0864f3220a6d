"""Tier limits on the distribution evidence, derived from benign reference runs (pure).

Per run the zoo (or `invarlock calibrate`) records the upper bound of mean KLD's paired
interval (`kld_mean_high`), the lower bound of "same top p" (`same_top_p_low`) and the 99%
KLD point (`kld_p99`) and whether the primary metric passed (`primary_ok`); the committed
rows are `policies/calibration/distribution.csv`. The null is the benign runs the primary
metric passes, less the zoo's uncalibrated families (`benign`). The rule, one factor f per
tier (conservative 1.5, balanced 2, aggressive 4 — the "twice the largest benign value" of
the whole-model limits for balanced):

- `kld_mean_upper` = f × the largest null `kld_mean_high` over every model, rounded up to
  two significant digits;
- `same_top_p_lower` = 1 − f × the largest null disagreement (1 − `same_top_p_low`),
  rounded down to 0.001 (at least 0);
- `kld_p99_upper` is not derived: the percentile has no interval, so a limit on it could not
  hold a false-alarm rate across window counts; it is recorded for comparison only.

`derive` is what the shipped `tiers.yaml` holds (tests/test_calibrate_distribution.py
recomputes it from the committed rows), and what `invarlock calibrate` writes for its tier.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from invarlock.calibration import csv_cells

FACTORS = {"conservative": 1.5, "balanced": 2.0, "aggressive": 4.0}
COLUMNS = ("model", "family", "kind", "seed", "ratio", "primary_ok", "kld_mean",
           "kld_mean_high", "same_top_p", "same_top_p_low", "kld_p99", "tokens")
MEASURED = COLUMNS[6:]
_TEXT = ("model", "family", "kind")
_PRIMARY_FLAGS = ("not_catastrophic", "primary_metric_acceptable")
# zoo_run.UNCALIBRATED (this module is the zoo runner's dependency, not the other way round):
# 50% sparsity without the fine-tuning it assumes, recorded but no reference for the null
UNCALIBRATED = ("prune24", "wanda")


def round_up(x: float, digits: int = 2) -> float:
    """Up to `digits` significant digits, never below x (a limit is never tighter than its
    rule)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    up = math.ceil(round(x * scale, 9)) / scale
    return float(f"{up:.{digits}g}")


def round_down(x: float, step: float = 0.001) -> float:
    """Down to a multiple of `step`, never above x, and not below 0."""
    return max(0.0, math.floor(round(x / step, 9)) * step)


def benign(rows: Iterable[Mapping[str, Any]],
           excluded: Sequence[str] = UNCALIBRATED) -> list[Mapping[str, Any]]:
    """The null: benign rows that measured the distribution evidence and that the primary
    metric passes, of families not `excluded`. A "benign" family the perplexity gate already
    fails on a model (4-bit RTN of SmolLM2-135M doubles its perplexity) is no reference for a
    finer measure: its verdict is FAIL whatever the distribution limits say. The zoo's
    uncalibrated families (50% pruning without fine-tuning) are recorded, not references,
    even on a model whose perplexity they happen to spare."""
    return [r for r in rows if r["kind"] == "benign" and r.get("kld_mean_high") is not None
            and r.get("primary_ok") and r["family"] not in excluded]


def derive(rows: Sequence[Mapping[str, Any]], factors: Mapping[str, float] = FACTORS,
           excluded: Sequence[str] = UNCALIBRATED) -> dict[str, dict[str, float]]:
    """{tier: {"kld_mean_upper", "same_top_p_lower"}} from the benign rows of every model
    (`benign`: the families in `excluded` are no part of the null)."""
    null = benign(rows, excluded)
    if not null:
        raise ValueError("no benign run recorded distribution evidence")
    kld = max(float(r["kld_mean_high"]) for r in null)
    disagreement = max(1.0 - float(r["same_top_p_low"]) for r in null)
    return {tier: {"kld_mean_upper": round_up(f * kld),
                   "same_top_p_lower": round(round_down(1.0 - f * disagreement), 3)}
            for tier, f in factors.items()}


def decide(row: Mapping[str, Any], limits: Mapping[str, float | None]) -> bool:
    """Whether a run's recorded bounds pass `limits` (the gate's rule, from the row)."""
    kld, top = limits.get("kld_mean_upper"), limits.get("same_top_p_lower")
    return ((kld is None or float(row["kld_mean_high"]) <= kld)
            and (top is None or float(row["same_top_p_low"]) >= top))


def row_of(model: str, family: str, kind: str, seed: int,
           cert: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row from a certificate's `distribution` section (None where not measured)."""
    d = cert.get("distribution") or {}
    validation = cert.get("validation") or {}
    row: dict[str, Any] = {"model": model, "family": family, "kind": kind, "seed": seed,
                           "ratio": cert["primary_metric"].get("ratio"),
                           "primary_ok": all(validation.get(f) for f in _PRIMARY_FLAGS)}
    if not d:
        return {**row, **dict.fromkeys(MEASURED)}
    return {**row, "kld_mean": d["kld_mean"]["estimate"], "kld_mean_high": d["kld_mean"]["high"],
            "same_top_p": d["same_top_p"]["estimate"],
            "same_top_p_low": d["same_top_p"]["low"], "kld_p99": d["kld"]["p99"],
            "tokens": d["tokens"]}


def read_rows(text: str, where: str = "distribution.csv") -> list[dict[str, Any]]:
    """Rows with numbers as floats (empty: None); anything else in a numeric column is an
    error naming the line and the column, so a garbled row cannot pass as data."""
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ValueError(f"{where}: columns {reader.fieldnames} are not {list(COLUMNS)}")
    rows = []
    for line, raw in enumerate(reader, start=2):
        row: dict[str, Any] = {}
        for key, value in raw.items():
            if key is None or value is None:
                raise ValueError(f"{where}:{line}: wrong number of fields")
            cell = f"{where}:{line}: {key}"
            row[key] = (value if key in _TEXT else csv_cells.flag(value, cell)
                        if key == "primary_ok" else csv_cells.number(value, cell))
        if row["kind"] not in ("benign", "harmful"):
            raise ValueError(f"{where}:{line}: kind must be benign or harmful")
        rows.append(row)
    return rows


def write_rows(rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in rows)
    return buffer.getvalue()


def table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """CALIBRATION.md's table per model: benign runs, the largest benign bounds and the
    run that set them, and the harmful runs the balanced limits catch."""
    limits = derive(rows)["balanced"]
    lines = ["| Model | benign runs (null) | largest mean KLD upper bound (run) | lowest same "
             "top p lower bound (run) | largest 99% KLD | harmful runs caught (balanced) |",
             "|---|---:|---|---|---:|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        null = benign(mine)
        if not null:
            continue
        kld = max(null, key=lambda r: float(r["kld_mean_high"]))
        top = min(null, key=lambda r: float(r["same_top_p_low"]))
        harmful = [r for r in mine if r["kind"] == "harmful"
                   and r.get("kld_mean_high") is not None]
        caught = sum(1 for r in harmful if not decide(r, limits))
        measured = [r for r in mine if r["kind"] == "benign"
                    and r.get("kld_mean_high") is not None]
        lines.append(f"| {model} | {len(measured)} ({len(null)}) | "
                     f"{float(kld['kld_mean_high']):.5f} "
                     f"({kld['family']}:{int(kld['seed'])}) | "
                     f"{100 * float(top['same_top_p_low']):.2f}% "
                     f"({top['family']}:{int(top['seed'])}) | "
                     f"{max(float(r['kld_p99']) for r in null):.4f} | "
                     f"{caught} of {len(harmful)} |")
    return lines


def calibrate(result: Any, references: Sequence[tuple[str, Mapping[str, Any]]],
              tier: str) -> tuple[Any, dict[str, Any]]:
    """`invarlock calibrate`'s part: the reference certificates' rows, and the tier's limits
    added to the preset (`eval.distribution`) where the runs measured the evidence.
    `result` is the recipe's Calibration; returns it with the overrides, and the statistics."""
    from dataclasses import replace

    rows = []
    for label, cert in references:
        parts = label.split(":")
        seed = int(parts[-1]) if parts[-1].isdigit() else 0
        family = parts[-2] if parts[-1].isdigit() else "_".join(parts)
        rows.append(row_of("reference", family, "benign", seed, cert))
    stats: dict[str, Any] = {"rule": f"factor {FACTORS.get(tier)} ({tier}) x the largest "
                                     "benign bound (distribution_limits.derive)",
                             "rows": rows}
    # references are what the user named: a 50% pruning named on its own is one (runner.py)
    if tier not in FACTORS or not benign(rows, excluded=()):
        stats["note"] = "not calibrated: no benign run measured the distribution evidence"
        return result, stats
    limits = derive(rows, {tier: FACTORS[tier]}, excluded=())[tier]
    stats["limits"] = limits
    overrides = {**result.overrides, "eval": {**result.overrides.get("eval", {}),
                                              "distribution": limits}}
    return replace(result, overrides=overrides), stats
