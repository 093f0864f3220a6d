"""The shipped tier thresholds, recomputed from the committed raw calibration inputs (pure).

`policies/calibration/<model>/calibration.csv` holds one row per benign reference run (what
`invarlock calibrate` read from its certificate); `calibration.json` next to it holds the
per-run top |z| of every spectral family and the settings. Every calibrated number in
`policies/tiers.yaml` follows from those raw inputs, per tier (its `max_caps` and VE
sidedness):

- spectral κ_f: per model, the order statistic of the per-run |z| (`top_abs_z`) with the
  budget split by family size, + margin, rounded up to 0.01; the tier value is the largest
  over the models; families too small for a robust z (embed, other) take the largest
  calibrated κ. Each run's largest |z| in the CSV must be the first of its `top_abs_z`;
- spectral `module_change_limit`: `limit_factor` × the largest `max_abs_change` of any row of
  any model, rounded up to 0.01 (`recipe.module_limit`), the same for every calibrated tier;
- VE `min_effect_lognll`: per model, VE's own σ_Δ pooled over the rows whose VE gate ran
  (`ve_sigma_delta` over `ve_windows`), z·σ_Δ/√K one-sided for a one-sided tier, two-sided
  otherwise; the larger over the models, rounded up to two significant figures. None when
  no model has such a row (the tier value is then a design choice);
- RMT `null_slack`: per family, the largest `<family>_rmt_delta` of any row; the shipped ε
  is a design choice that must cover it.

A consequence, and the stated design: benign edits move σ by well under 1%, so the
computed module limit lies below every tier's deadband, and the spectral guard (which
compares each module with the larger of the two) fails exactly when some module's σ moves
beyond the deadband. κ ≈ 1 (the order statistic over such tiny changes), the family screen
and the WARN budget are then recorded diagnostics that never change a verdict
(`tests/test_calibrate.py` holds this for the shipped tiers).

`check` lists every place where the committed files disagree with themselves: the derived
fields of calibration.json recomputed from the raw rows, the CSV rows against the JSON's
copy of them. `aggressive` relaxes `balanced`: κ + 1, twice the module limit and the minimum
effect.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from invarlock.calibration import recipe
from invarlock.guards import spectral

CALIBRATED_TIERS = ("balanced", "conservative")
_TEXT_COLUMNS = ("run",)
_FLAG_SUFFIXES = ("_pass", "_stable", "_ok")


@dataclass(frozen=True)
class ModelCalibration:
    """One model's committed calibration: the JSON statistics and the parsed CSV rows."""

    name: str
    stats: Mapping[str, Any]
    rows: tuple[dict[str, Any], ...]

    @property
    def settings(self) -> recipe.Settings:
        known = set(recipe.Settings.__dataclass_fields__)
        return recipe.Settings(**{k: v for k, v in self.stats["settings"].items()
                                  if k in known})


def parse_rows(text: str, where: str = "calibration.csv") -> tuple[dict[str, Any], ...]:
    """CSV rows with numbers as floats (empty: None) and flags as booleans.

    Anything else in a numeric or flag column is an error naming the row and the column, so
    a garbled row cannot pass as data.
    """
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for line, raw in enumerate(reader, start=2):
        row: dict[str, Any] = {}
        for key, value in raw.items():
            if key is None or value is None:
                raise ValueError(f"{where}:{line}: wrong number of fields")
            row[key] = _cell(key, value, f"{where}:{line}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{where}: no rows")
    return tuple(rows)


def _cell(key: str, value: str, where: str) -> Any:
    if key in _TEXT_COLUMNS:
        return value
    if key.endswith(_FLAG_SUFFIXES):
        if value not in ("True", "False"):
            raise ValueError(f"{where}: {key} must be True or False, got {value!r}")
        return value == "True"
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {key} must be finite, got {value!r}")
    return number


def check(model: ModelCalibration) -> list[str]:
    """Every disagreement between the raw rows and what calibration.json derived from them."""
    stats, rows, settings = model.stats, model.rows, model.settings
    out: list[str] = []
    runs = [r["run"] for r in rows]
    if runs != list(stats["runs"]):
        out.append(f"{model.name}: CSV runs {runs} differ from calibration.json runs")
    json_rows = [{k: _number(v) for k, v in r.items()} for r in stats["per_run"]]
    csv_rows = [{k: _number(v) for k, v in r.items()} for r in rows]
    if json_rows != csv_rows:
        out.append(f"{model.name}: CSV rows differ from calibration.json per_run")
    for row in rows:
        top = stats["top_abs_z"].get(row["run"], {})
        for fam in recipe.FAMILIES:
            largest = row.get(f"{fam}_max_abs_z")
            first = (top.get(fam) or [None])[0]
            if largest is not None and first is not None and not _close(largest, first):
                out.append(f"{model.name}: {row['run']} {fam}_max_abs_z {largest} is not the "
                           f"largest recorded |z| {first}")
    sizes = _family_sizes(stats)
    budgets = recipe.budget_split(settings.budget, sizes)
    for fam, m_f in sizes.items():
        entry = stats["spectral"][fam]
        if m_f < spectral.MIN_FAMILY_FOR_Z:
            continue
        order = recipe.kappa_order_statistic(
            [top.get(fam, []) for top in stats["top_abs_z"].values()], budgets.get(fam, 0),
            settings.margin)
        if not _close(entry.get("order_statistic"), order):
            out.append(f"{model.name}: spectral.{fam}.order_statistic "
                       f"{entry.get('order_statistic')} but the recorded |z| give {order}")
    limit = stats["spectral"]["module_change_limit"]
    largest = max(float(r["max_abs_change"]) for r in rows)
    if not _close(limit.get("largest_null_change"), largest) or not _close(
            limit.get("limit"), recipe.module_limit(largest, settings.limit_factor)):
        out.append(f"{model.name}: spectral.module_change_limit {limit} but the rows give "
                   f"largest {largest}, limit "
                   f"{recipe.module_limit(largest, settings.limit_factor)}")
    for fam, entry in stats["rmt"].items():
        column = [r.get(f"{fam}_rmt_delta") for r in rows]
        deltas = [float(v) for v in column if v is not None]
        if [float(v) for v in entry["null_deltas"]] != deltas:
            out.append(f"{model.name}: rmt.{fam}.null_deltas differ from the CSV column")
        eps = recipe.epsilon(deltas, settings.quantile, bool(entry["small_family"]),
                             settings.epsilon_floor)
        if not _close(entry["epsilon"], eps):
            out.append(f"{model.name}: rmt.{fam}.epsilon {entry['epsilon']} but the rows "
                       f"give {eps}")
    windows = recipe.window_statistics(rows, settings)
    for key in ("sigma_delta", "recommended_per_set", "note"):
        if not _same(stats["windows"].get(key), windows.get(key)):
            out.append(f"{model.name}: windows.{key} {stats['windows'].get(key)} but the "
                       f"rows give {windows.get(key)}")
    ve = recipe.ve_statistics(rows, settings)
    for key in ("sigma_delta", "one_sided", "two_sided", "runs_with_gate", "note"):
        if not _same(stats["variance"].get(key), ve.get(key)):
            out.append(f"{model.name}: variance.{key} {stats['variance'].get(key)} but the "
                       f"rows give {ve.get(key)}")
    return out


def _family_sizes(stats: Mapping[str, Any]) -> dict[str, int]:
    return {f: int(v["modules"]) for f, v in stats["spectral"].items()
            if isinstance(v, Mapping) and "modules" in v}


def _caps(model: ModelCalibration, budget: int) -> dict[str, float]:
    stats = model.stats
    sizes = _family_sizes(stats)
    budgets = recipe.budget_split(budget, sizes)
    out = {}
    for fam, m_f in sizes.items():
        if m_f < spectral.MIN_FAMILY_FOR_Z:
            continue
        runs = [top.get(fam, []) for top in stats["top_abs_z"].values()]
        out[fam] = recipe._round_up(recipe.kappa_order_statistic(
            runs, budgets.get(fam, 0), model.settings.margin), 2)
    return out


def derive(models: Sequence[ModelCalibration],
           tiers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{tier: {"family_caps", "module_change_limit", "min_effect_lognll", "null_slack"}}."""
    out: dict[str, dict[str, Any]] = {}
    largest = max(float(r["max_abs_change"]) for m in models for r in m.rows)
    factor = max(m.settings.limit_factor for m in models)
    limit = recipe.module_limit(largest, factor)
    slack = _null_slack(models)
    for tier in CALIBRATED_TIERS:
        guards = tiers[tier]["guards"]
        budget = int(guards["spectral"]["max_caps"])
        caps: dict[str, float] = {}
        for model in models:
            for fam, kappa in _caps(model, budget).items():
                caps[fam] = max(caps.get(fam, 0.0), kappa)
        top = max(caps.values())
        family_caps = {f: caps.get(f, top) for f in spectral.FAMILIES}
        side = "one_sided" if guards["variance"]["gating"]["sided"] == "one-sided" else (
            "two_sided")
        effects = [ve[side] for ve in (recipe.ve_statistics(m.rows, m.settings)
                                       for m in models) if side in ve]
        effect = recipe._round_up_significant(max(effects)) if effects else None
        out[tier] = {"family_caps": family_caps, "module_change_limit": limit,
                     "min_effect_lognll": effect, "null_slack": dict(slack)}
    bal = out["balanced"]
    out["aggressive"] = {
        "family_caps": {f: round(v + 1.0, 2) for f, v in bal["family_caps"].items()},
        "module_change_limit": round(2 * bal["module_change_limit"], 2),
        "min_effect_lognll": (None if bal["min_effect_lognll"] is None
                              else 2 * bal["min_effect_lognll"]),
        "null_slack": bal["null_slack"]}
    return out


def _null_slack(models: Sequence[ModelCalibration]) -> dict[str, float]:
    """Per family, the largest RMT slack any row needed (`<family>_rmt_delta`)."""
    slack: dict[str, float] = {}
    for model in models:
        for fam in recipe.FAMILIES:
            values = [float(r[f"{fam}_rmt_delta"]) for r in model.rows
                      if r.get(f"{fam}_rmt_delta") is not None]
            if values:
                slack[fam] = max(slack.get(fam, 0.0), max(values))
    return slack


def statistics_table(models: Sequence[ModelCalibration]) -> list[str]:
    """The Markdown table of CALIBRATION.md's per-model statistics, from the raw rows."""
    lines = ["| Model | runs | largest benign \\|σ change\\| (run) | module limit "
             "| RMT null slack | VE own σ_Δ (runs with a gate) | primary σ_Δ (windows for "
             "±0.001) |",
             "|---|---:|---|---:|---|---|---|"]
    for m in models:
        worst = max(m.rows, key=lambda r: float(r["max_abs_change"]))
        largest = float(worst["max_abs_change"])
        slack = ", ".join(f"{fam} {value:.3f}" for fam, value in _null_slack([m]).items())
        ve = recipe.ve_statistics(m.rows, m.settings)
        ve_text = (f"{ve['sigma_delta']:.5f} ({ve['runs_with_gate']})" if "sigma_delta" in ve
                   else "not recorded")
        win = recipe.window_statistics(m.rows, m.settings)
        win_text = (f"{win['sigma_delta']:.5f} ({win['recommended_per_set']})"
                    if "sigma_delta" in win else "not recorded")
        lines.append(f"| {m.name} | {len(m.rows)} | {100 * largest:.4f}% ({worst['run']}) "
                     f"| {recipe.module_limit(largest, m.settings.limit_factor):.2f} "
                     f"| {slack} | {ve_text} | {win_text} |")
    return lines


def _number(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return float(value)


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else _close(a, b)


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
