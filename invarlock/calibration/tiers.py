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
- VE `min_effect_lognll`: per model, VE's own σ_Δ from `ve-paired-windows.csv` (the gate's
  NLL per window of every reference run, the subject as it is and with VE's proposed
  scales): per run the standard deviation of the per-window Δ, pooled over the runs
  (`recipe.ve_per_run`, `recipe.ve_statistics`), z·σ_Δ/√K one-sided for a one-sided tier,
  two-sided otherwise; the larger over the models, rounded up to two significant figures.
  σ_Δ is in nats/token of one model's loss, so one model's value says nothing of another's:
  the minimum effect is calibrated only when every model recorded VE's Δ, and is None
  otherwise (the tier value is then a design choice). The CSV's `ve_sigma_delta` and
  `ve_windows` must agree with the raw windows;
- RMT `null_tau`: per model, from `rmt-null-modules.csv` (Δ_m and N_m of every module of
  every benign run) by `rmt_null.null_tau`: each run's upper 95% bound, the largest rounded
  up to 0.01; the tier value is the largest over the models (every tier: the null does not
  depend on the tier). Each row's `rmt_null_scale` must be its run's recomputed bound;
- RMT `null_slack`: per family, the largest `<family>_rmt_delta` of any row; the shipped ε
  is a design choice that must cover it.

A consequence, and the stated design: the spectral guard compares each module with the
larger of deadband and module limit. The computed limit (twice the largest benign change
along the data, SmolLM2's 10% pruning) lies below the balanced and aggressive deadbands, so
those tiers fail exactly when some module's σ moves beyond the deadband, and κ, the family
screen and the WARN budget are recorded diagnostics that never change a verdict; it lies
above the conservative deadband, where a change between the two is decided by the robust z
screen (`tests/test_calibrate.py` holds this for the shipped tiers).

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

from invarlock.calibration import csv_cells, recipe, rmt_null
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
    rmt_modules: tuple[dict[str, Any], ...] = ()   # rmt-null-modules.csv, parsed
    ve_windows: tuple[dict[str, Any], ...] = ()    # ve-paired-windows.csv, parsed

    def ve_rows(self) -> list[dict[str, Any]]:
        """Per run {ve_sigma_delta, ve_windows}: from the raw windows where committed, else
        the CSV's own columns."""
        return recipe.ve_per_run(self.ve_windows) if self.ve_windows else list(self.rows)

    @property
    def settings(self) -> recipe.Settings:
        known = set(recipe.Settings.__dataclass_fields__)
        return recipe.Settings(**{k: v for k, v in self.stats["settings"].items()
                                  if k in known})


def parse_ve_windows(text: str, where: str = "ve-paired-windows.csv") -> tuple[
        dict[str, Any], ...]:
    """The committed VE gate windows; anything but a number (a positive token count) in a
    numeric column is an error naming the line."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in recipe.VE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{where}: missing columns {', '.join(missing)}")
    rows = []
    for line, raw in enumerate(reader, start=2):
        row: dict[str, Any] = {"run": raw["run"]}
        for key in recipe.VE_COLUMNS[1:]:
            row[key] = _cell(key, raw[key] or "", f"{where}:{line}")
            if row[key] is None:
                raise ValueError(f"{where}:{line}: {key} is empty")
        if row["tokens"] <= 0:
            raise ValueError(f"{where}:{line}: tokens must be positive")
        rows.append(row)
    return tuple(rows)


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
        return csv_cells.flag(value, f"{where}: {key}")
    return csv_cells.number(value, f"{where}: {key}")


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
    out += _check_null_tau(model)
    out += _check_ve_columns(model)
    ve = recipe.ve_statistics(model.ve_rows(), settings)
    for key in ("sigma_delta", "one_sided", "two_sided", "runs_with_gate",
                "runs_without_effect", "note"):
        if not _same(stats["variance"].get(key), ve.get(key)):
            out.append(f"{model.name}: variance.{key} {stats['variance'].get(key)} but the "
                       f"rows give {ve.get(key)}")
    return out


def _check_ve_columns(model: ModelCalibration) -> list[str]:
    """Each CSV row's VE columns against its run's raw windows (when those are committed)."""
    if not model.ve_windows:
        return []
    raw = {r["run"]: r for r in model.ve_rows()}
    out = []
    for row in model.rows:
        mine = raw.get(row["run"], {"ve_sigma_delta": None, "ve_windows": 0})
        if not _close(row.get("ve_sigma_delta"), mine["ve_sigma_delta"]) or int(
                row.get("ve_windows") or 0) != mine["ve_windows"]:
            out.append(f"{model.name}: {row['run']} ve_sigma_delta {row.get('ve_sigma_delta')}"
                       f" over {row.get('ve_windows')} windows but its VE windows give "
                       f"{mine['ve_sigma_delta']} over {mine['ve_windows']}")
    extra = sorted(set(raw) - {r["run"] for r in model.rows})
    if extra:
        out.append(f"{model.name}: VE windows of runs not in the CSV: {', '.join(extra)}")
    return out


def _check_null_tau(model: ModelCalibration) -> list[str]:
    """The recorded null_tau and each row's null scale against the per-module rows."""
    recorded = model.stats.get("rmt_null")
    if not model.rmt_modules:
        return [f"{model.name}: calibration.json records rmt_null but no per-module rows "
                "are committed"] if recorded else []
    null = rmt_null.null_tau(model.rmt_modules)
    out = []
    if recorded is None or not _close(recorded.get("largest"), null.largest) or not _close(
            recorded.get("null_tau"), null.tau) or recorded.get("run") != null.run:
        out.append(f"{model.name}: rmt_null {recorded} but the module rows give null_tau "
                   f"{null.tau} (largest {null.largest} in {null.run})")
    runs = {r["run"] for r in model.rows}
    if set(null.per_run) != runs:
        out.append(f"{model.name}: the RMT module rows cover runs "
                   f"{sorted(set(null.per_run) ^ runs)} that the CSV rows do not (or the "
                   "reverse)")
    for row in model.rows:
        if row["run"] in null.per_run and not _close(row.get("rmt_null_scale"),
                                                     null.per_run[row["run"]]):
            out.append(f"{model.name}: {row['run']} rmt_null_scale {row.get('rmt_null_scale')}"
                       f" but its module rows give {null.per_run[row['run']]}")
    return out


def null_tau(models: Sequence[ModelCalibration]) -> float | None:
    """The shipped `null_tau`: the largest model's, None when no model committed its rows."""
    taus = [rmt_null.null_tau(m.rmt_modules).tau for m in models if m.rmt_modules]
    return max(taus) if taus else None


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
    """{tier: {"family_caps", "module_change_limit", "min_effect_lognll", "null_slack",
    "null_tau"}}."""
    out: dict[str, dict[str, Any]] = {}
    largest = max(float(r["max_abs_change"]) for m in models for r in m.rows)
    factor = max(m.settings.limit_factor for m in models)
    limit = recipe.module_limit(largest, factor)
    slack = _null_slack(models)
    tau = null_tau(models)
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
        effects = [ve[side] for ve in (recipe.ve_statistics(m.ve_rows(), m.settings)
                                       for m in models) if side in ve]
        every = effects and len(effects) == len(models)  # σ_Δ is per model's loss scale
        effect = recipe._round_up_significant(max(effects)) if every else None
        out[tier] = {"family_caps": family_caps, "module_change_limit": limit,
                     "min_effect_lognll": effect, "null_slack": dict(slack),
                     "null_tau": tau}
    bal = out["balanced"]
    out["aggressive"] = {
        "family_caps": {f: round(v + 1.0, 2) for f, v in bal["family_caps"].items()},
        "module_change_limit": round(2 * bal["module_change_limit"], 2),
        "min_effect_lognll": (None if bal["min_effect_lognll"] is None
                              else 2 * bal["min_effect_lognll"]),
        "null_slack": bal["null_slack"], "null_tau": tau}
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
        ve = recipe.ve_statistics(m.ve_rows(), m.settings)
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
