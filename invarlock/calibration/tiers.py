"""The shipped tier thresholds, recomputed from committed calibration statistics (pure).

`policies/calibration/<model>/calibration.json` are the statistics `invarlock calibrate`
wrote for each reference model. From them, per tier (its `max_caps`, `deadband` and VE
sidedness):

- spectral κ_f: per model, the order statistic of the recorded per-run |z| with the budget
  split by family size, + margin, rounded up to 0.01; the tier value is the largest over the
  models; families too small for a robust z (embed, other) take the largest calibrated κ;
- spectral `module_change_limit`: twice the largest null |σ change| over every model's runs,
  at least twice the tier's deadband, rounded up to 0.01;
- VE `min_effect_lognll`: the larger over the models of z·σ_Δ/√K (one-sided for a one-sided
  tier, two-sided otherwise), rounded up to two significant figures;
- RMT: the largest relative slack the null runs needed beyond the spread term
  (`null_slack`); the shipped ε is a design choice that must cover it.

`aggressive` relaxes `balanced`: κ + 1, twice the module limit and the minimum effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock.calibration import recipe
from invarlock.guards import spectral

CALIBRATED_TIERS = ("balanced", "conservative")


def _caps(stats: Mapping[str, Any], budget: int, margin: float) -> dict[str, float]:
    sizes = {f: int(v["modules"]) for f, v in stats["spectral"].items()
             if isinstance(v, Mapping) and "modules" in v}
    budgets = recipe.budget_split(budget, sizes)
    out = {}
    for fam, m_f in sizes.items():
        if m_f < spectral.MIN_FAMILY_FOR_Z:
            continue
        runs = [top.get(fam, []) for top in stats["top_abs_z"].values()]
        out[fam] = recipe._round_up(recipe.kappa_order_statistic(
            runs, budgets.get(fam, 0), margin), 2)
    return out


def derive(calibrations: Mapping[str, Mapping[str, Any]],
           tiers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{tier: {"family_caps", "module_change_limit", "min_effect_lognll", "null_slack"}}."""
    out: dict[str, dict[str, Any]] = {}
    for tier in CALIBRATED_TIERS:
        guards = tiers[tier]["guards"]
        budget = int(guards["spectral"]["max_caps"])
        caps: dict[str, float] = {}
        for stats in calibrations.values():
            margin = float(stats["settings"]["margin"])
            for fam, kappa in _caps(stats, budget, margin).items():
                caps[fam] = max(caps.get(fam, 0.0), kappa)
        largest = max(caps.values())
        family_caps = {f: caps.get(f, largest) for f in spectral.FAMILIES}
        change = max(float(row["max_abs_change"]) for stats in calibrations.values()
                     for row in stats["per_run"])
        limit = recipe.module_limit(change, float(guards["spectral"]["deadband"]))
        side = "one_sided" if guards["variance"]["gating"]["sided"] == "one-sided" else (
            "two_sided")
        effect = recipe._round_up_significant(max(
            float(stats["variance"][side]) for stats in calibrations.values()))
        slack: dict[str, float] = {}
        for stats in calibrations.values():
            for fam, entry in stats["rmt"].items():
                slack[fam] = max(slack.get(fam, 0.0), max(entry["null_deltas"]))
        out[tier] = {"family_caps": family_caps, "module_change_limit": limit,
                     "min_effect_lognll": effect, "null_slack": slack}
    bal = out["balanced"]
    out["aggressive"] = {
        "family_caps": {f: round(v + 1.0, 2) for f, v in bal["family_caps"].items()},
        "module_change_limit": round(2 * bal["module_change_limit"], 2),
        "min_effect_lognll": 2 * bal["min_effect_lognll"], "null_slack": bal["null_slack"]}
    return out
