"""The recalibration recipe as pure functions over reference certificates (numpy/scipy only).

Reference comparisons are benign edits of the baseline (INT8 RTN, and uniform noise of one
INT8 step with different seeds) certified with every guard in monitor mode. From them:

- spectral κ_f, order statistic (recommended): the WARN budget B (`max_caps`) is split by
  family size, B_f = ⌊B·M_f/M + 0.5⌋ (at least 1); per run κ_f is the B_f-th largest |z| of
  the family plus a margin, so at most B_f − 1 modules exceed it; over runs the largest.
  Parametric alternative: with normal two-sided tails, κ_f = Φ⁻¹(1 − B_f/(2M_f)) + margin
  (about B_f exceedances expected among M_f modules).
- RMT ε_f: the relative slack on the baseline's outlier count that the null runs needed
  beyond the spread term, Δ_f = max(0, (|excess| − null_z·spread·√G − 1) / baseline count),
  the largest over the family and its modules; ε_f = its `quantile` over runs (the maximum
  for small families), plus a floor.
- RMT `null_tau`: per run the upper 95% bound on the scale of its modules' outlier excess
  (`rmt.null_scale` over the (Δ_m, N_m) of its modules), the largest over the runs, rounded
  up to 0.01 (`invarlock.calibration.rmt_null`).
- spectral `module_change_limit`: `limit_factor` (2) times the largest |σ_s/σ_b − 1| of
  any module in any reference run, rounded up to 0.01: computed from the null, whatever the
  deadband (a floor, when a tier wants one, is an explicit setting, not the default).
- VE min effect: from σ_Δ^VE, the standard deviation of VE's own per-window paired
  ΔlogNLL (the subject with the proposed scales against the subject as it is, on the
  gate's K windows) pooled over the reference runs whose VE gate ran and whose scales
  moved the loss (some window's |Δ| above `VE_NO_EFFECT`: a function-preserving edit leaves
  the block outputs' second moments as they were, VE's scales are 1 to float rounding and
  their Δ is rounding, which says nothing of the noise of a real rescale and would only
  dilute the pool), sqrt(Σ(Kᵢ − 1)sᵢ² / Σ(Kᵢ − 1)): min_effect = z·σ_Δ^VE/√K with K the
  calibration windows and z = Φ⁻¹(1 − α) one-sided (balanced) or Φ⁻¹(1 − α/2) two-sided
  (conservative). With no such run the minimum effect is not calibrated (the tier's value
  stays).
- Windows: the CI half-width of the mean paired Δ of the primary metric is about
  Φ⁻¹(1 − α/2)·σ_Δ/√n, so a target half-width h needs n = ⌈(Φ⁻¹(1 − α/2)·σ_Δ/h)²⌉ windows;
  σ_Δ is the per-window standard deviation pooled within runs, like VE's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import ndtri

from invarlock.calibration import rmt_null
from invarlock.guards import rmt, spectral

FAMILIES = ("attn", "ffn", "embed", "other")
SMALL_FAMILY = 8  # fewer modules: ε from the maximum instead of the quantile


@dataclass(frozen=True)
class ReferenceRun:
    """What calibration reads from one reference certificate."""

    label: str                               # e.g. "quant_noise:3"
    abs_z: dict[str, list[float]]            # spectral |z| per module, by family
    family_sizes: dict[str, int]
    rmt_delta: dict[str, float]              # relative slack the null run needed, by family
    max_abs_change: float                    # largest spectral |σ_s/σ_b − 1| of any module
    top_abs_z: dict[str, list[float]] = field(default_factory=dict)  # recorded, 10 per family
    window_delta: list[float] = field(default_factory=list)  # per-window paired ΔlogNLL, final
    ve_delta: list[float] = field(default_factory=list)  # VE gate: scaled − plain, per window
    rmt_modules: list[dict[str, Any]] = field(default_factory=list)  # (Δ_m, N_m) per module
    ve_rows: list[dict[str, Any]] = field(default_factory=list)  # VE gate's raw windows
    ratio: float | None = None
    flags: dict[str, bool] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """Flat CSV-ready summary of the run."""
        out: dict[str, Any] = {"run": self.label, "ratio": self.ratio,
                               "sigma_delta": _std(self.window_delta),
                               "windows": len(self.window_delta),
                               "max_abs_change": self.max_abs_change,
                               "ve_sigma_delta": _std(self.ve_delta),
                               "ve_windows": len(self.ve_delta),
                               "ve_max_abs_delta": _largest_abs(self.ve_delta),
                               "rmt_null_scale": self.rmt_null_scale}
        for f in FAMILIES:
            zs = sorted(self.abs_z.get(f, []), reverse=True)
            out[f"{f}_modules"] = self.family_sizes.get(f, 0)
            out[f"{f}_max_abs_z"] = zs[0] if zs else None
            out[f"{f}_rmt_delta"] = self.rmt_delta.get(f)
        out.update({k: v for k, v in self.flags.items() if k.endswith(
            ("_pass", "_stable", "_ok"))})
        return out


    @property
    def rmt_null_scale(self) -> float | None:
        """The run's upper 95% bound on τ (None when RMT was not measured)."""
        if not self.rmt_modules:
            return None
        return rmt_null.null_tau(self.rmt_modules).largest


def _std(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _largest_abs(values: Sequence[float]) -> float | None:
    return float(np.max(np.abs(values))) if len(values) else None


# nats/token: a VE rescale whose per-window |Δ| never exceeds this changed nothing the loss
# can see. Float32 rounding of a window's mean log-loss (a few nats) is ~1e-7; 100× that.
VE_NO_EFFECT = 1e-5


def reference_run(label: str, cert: Mapping[str, Any], sigma_quantile: float) -> ReferenceRun:
    """Extract the calibration statistics from one certificate (guards measured)."""
    guards = cert["guards"]
    abs_z: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    max_change = 0.0
    sp = guards.get("spectral", {}).get("measurements", {})
    if sp.get("evaluated", False):
        deadband = float(cert["policy"]["values"]["guards"]["spectral"]["deadband"])
        for s in spectral.score_modules(sp["modules"], sigma_quantile, FAMILIES,
                                        spectral.scale_floor(deadband)):
            abs_z.setdefault(s.family, []).append(abs(s.z))
            max_change = max(max_change, abs(s.r))
        sizes = {f: len(v) for f, v in abs_z.items()}
    rmt_delta: dict[str, float] = {}
    rmt_modules: list[dict[str, Any]] = []
    rm = guards.get("rmt", {}).get("measurements", {})
    if rm.get("evaluated", False):
        rmt_policy = cert["policy"]["values"]["guards"]["rmt"]
        null_z = float(rmt_policy.get("null_z", rmt.DEFAULT_NULL_Z))
        rmt_delta = rmt_slack(rm["modules"], null_z)
        band = float(rmt_policy.get("edge_band", rmt.DEFAULT_EDGE_BAND))
        rmt_modules = rmt_null.module_rows(label, rm["modules"], band)
    final = cert["windows"]["final"]
    deltas = [(s - b) / n for s, b, n in zip(final["subject"], final["baseline"],
                                             final["tokens"], strict=False)
              if s is not None and n > 0]
    top = {f: sorted(v, reverse=True)[:10] for f, v in abs_z.items()}
    return ReferenceRun(label, abs_z, sizes, rmt_delta, max_change, top_abs_z=top,
                        window_delta=deltas, ve_delta=ve_window_delta(guards),
                        rmt_modules=rmt_modules, ve_rows=ve_gate_rows(label, guards),
                        ratio=cert["primary_metric"]["ratio"], flags=dict(cert["validation"]))


def ve_window_delta(guards: Mapping[str, Any]) -> list[float]:
    """VE's own paired Δ per window (nats/token), where its predictive gate ran; else []."""
    return [(r["nll_scaled"] - r["nll_plain"]) / r["tokens"] for r in ve_gate_rows("", guards)]


VE_COLUMNS = ("run", "window", "tokens", "nll_plain", "nll_scaled")


def ve_gate_rows(run: str, guards: Mapping[str, Any]) -> list[dict[str, Any]]:
    """VE gate's raw per-window inputs (NLL sums of the subject as it is and with the proposed
    scales, tokens), one row per window with tokens; [] where the gate did not run."""
    gate = ((guards.get("variance") or {}).get("measurements") or {}).get("gate")
    if not gate:
        return []
    return [{"run": run, "window": int(w), "tokens": int(n), "nll_plain": float(p),
             "nll_scaled": float(s)}
            for w, n, p, s in zip(gate["window_ids"], gate["tokens"], gate["nll_plain"],
                                  gate["nll_scaled"], strict=True) if n > 0]


def ve_per_run(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """{run, ve_sigma_delta, ve_windows, ve_max_abs_delta} per run of raw VE rows
    (`ve_gate_rows`): the standard deviation and the largest |·| of (NLL_scaled −
    NLL_plain)/tokens over the run's windows, in first-seen order."""
    deltas: dict[str, list[float]] = {}
    for r in rows:
        deltas.setdefault(str(r["run"]), []).append(
            (float(r["nll_scaled"]) - float(r["nll_plain"])) / float(r["tokens"]))
    return [{"run": run, "ve_sigma_delta": _std(d), "ve_windows": len(d),
             "ve_max_abs_delta": _largest_abs(d)} for run, d in deltas.items()]


def pooled_sd(sds: Sequence[float], counts: Sequence[int]) -> float | None:
    """sqrt(Σ(kᵢ − 1)sᵢ² / Σ(kᵢ − 1)) over groups with at least two values; None if none."""
    pairs = [(float(s), int(k)) for s, k in zip(sds, counts, strict=True)
             if k > 1 and s is not None]
    dof = sum(k - 1 for _, k in pairs)
    if dof == 0:
        return None
    return math.sqrt(sum((k - 1) * s * s for s, k in pairs) / dof)


def rmt_slack(modules: Sequence[Mapping[str, Any]], null_z: float) -> dict[str, float]:
    """Per family: the ε the run needed (0 when the spread term covered it), family and
    modules alike (see the module docstring)."""
    out: dict[str, float] = {}
    for fam in sorted({m["family"] for m in modules}):
        members = [m for m in modules if m["family"] == fam]
        pairs = [(rmt.counts(m["baseline"]), rmt.counts(m["subject"])) for m in members]
        pairs.append((np.sum([b for b, _ in pairs], axis=0), np.sum([s for _, s in pairs],
                                                                     axis=0)))
        need = 0.0
        for b, s in pairs:
            excess = abs(float(s.sum() - b.sum()))
            fixed, _ = rmt.margin(b, 0.0, null_z)
            if excess > fixed:
                need = max(need, (excess - fixed) / max(float(b.sum()), 1.0))
        out[fam] = need
    return out


def budget_split(budget: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """B_f = ⌊B·M_f/M + 0.5⌋ for each family present."""
    total = sum(sizes.values())
    return {f: math.floor(budget * m / total + 0.5) for f, m in sizes.items() if m}


def kappa_order_statistic(abs_z_runs: Sequence[Sequence[float]], b_f: int,
                          margin: float) -> float:
    """Largest over runs of the max(B_f, 1)-th largest |z|, plus the margin."""
    k = max(1, b_f)
    per_run = []
    for zs in abs_z_runs:
        ordered = sorted(zs, reverse=True)
        if ordered:
            per_run.append(ordered[min(k, len(ordered)) - 1])
    return float(max(per_run) + margin) if per_run else float("nan")


def kappa_parametric(m_f: int, b_f: int, margin: float) -> float:
    """Φ⁻¹(1 − B_f/(2 M_f)) + margin: about B_f two-sided normal exceedances in M_f."""
    p = min(0.5, max(1, b_f) / (2.0 * m_f))
    return float(ndtri(1.0 - p) + margin)


def epsilon(deltas: Sequence[float], quantile: float, small: bool, floor: float) -> float:
    """ε_f from null Δ_f: the quantile (the maximum for a small family), at least 0, + floor."""
    values = np.asarray(deltas, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    q = float(np.max(values)) if small else float(np.quantile(values, quantile))
    return max(q, 0.0) + floor


LIMIT_FACTOR = 2.0  # module limit = this × the largest null |σ change|


def module_limit(largest_null_change: float, factor: float = LIMIT_FACTOR,
                 floor: float = 0.0) -> float:
    """`factor` × the largest null |σ change|, at least `floor`, rounded up to 0.01."""
    if not (math.isfinite(largest_null_change) and largest_null_change >= 0):
        raise ValueError(f"largest null change must be a finite |σ change|, got "
                         f"{largest_null_change!r}")
    return _round_up(max(factor * largest_null_change, floor), 2)


def min_effect(sigma_delta: float, windows: int, alpha: float, sided: str) -> float:
    z = ndtri(1.0 - alpha) if sided == "one-sided" else ndtri(1.0 - alpha / 2.0)
    return float(z * sigma_delta / math.sqrt(windows))


def windows_for_half_width(sigma_delta: float, half_width: float, alpha: float) -> int:
    return math.ceil((ndtri(1.0 - alpha / 2.0) * sigma_delta / half_width) ** 2)


def _round_up(x: float, digits: int) -> float:
    scale = 10.0**digits
    return math.ceil(x * scale - 1e-9) / scale


def _round_up_significant(x: float, figures: int = 2) -> float:
    if x <= 0 or not math.isfinite(x):
        return x
    return _round_up(x, figures - 1 - math.floor(math.log10(x)))


@dataclass(frozen=True)
class Settings:
    budget: int                  # the tier's max_caps
    margin: float = 0.1          # added to κ
    quantile: float = 0.95       # ε quantile of null Δ_f
    epsilon_floor: float = 0.01
    windows: int = 16            # K, the VE gate's windows
    alpha: float = 0.05
    sided: str = "one-sided"
    half_width: float = 0.001    # target CI half-width (nats/token) for window sizing
    limit_factor: float = LIMIT_FACTOR  # module limit = factor × largest null |σ change|


@dataclass(frozen=True)
class Calibration:
    overrides: dict[str, Any]                 # preset fragment for `certify --preset`
    statistics: dict[str, Any]                # everything the numbers came from
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per reference run
    rmt_modules: list[dict[str, Any]] = field(default_factory=list)  # (Δ_m, N_m) per module
    ve_rows: list[dict[str, Any]] = field(default_factory=list)  # VE gate's raw windows


def calibrate(runs: Sequence[ReferenceRun], tier_guards: Mapping[str, Any],
              settings: Settings) -> Calibration:
    """Every calibrated number, the override YAML content and its statistics."""
    if not runs:
        raise ValueError("calibration needs at least one reference run")
    sizes = dict(runs[0].family_sizes)
    budgets = budget_split(settings.budget, sizes)
    caps = dict(tier_guards["spectral"]["family_caps"])
    eps = dict(tier_guards["rmt"]["epsilon_by_family"])
    stats: dict[str, Any] = {"runs": [r.label for r in runs], "spectral": {}, "rmt": {},
                             "top_abs_z": {r.label: r.top_abs_z for r in runs},
                             "variance": {}, "windows": {}, "settings": settings.__dict__}
    for f, m_f in sizes.items():
        b_f = budgets.get(f, 0)
        entry: dict[str, Any] = {"modules": m_f, "budget": b_f}
        if m_f < spectral.MIN_FAMILY_FOR_Z:
            entry["note"] = "too few modules for a robust z; the tier value is kept"
        else:
            order = kappa_order_statistic([r.abs_z.get(f, []) for r in runs], b_f,
                                          settings.margin)
            entry.update(order_statistic=order,
                         parametric=kappa_parametric(m_f, b_f, settings.margin),
                         max_abs_z=max(max(r.abs_z.get(f, [0.0])) for r in runs))
            caps[f] = _round_up(order, 2)
        stats["spectral"][f] = entry
    for f in sorted({f for r in runs for f in r.rmt_delta}):
        deltas = [r.rmt_delta[f] for r in runs if f in r.rmt_delta]
        small = sizes.get(f, 0) < SMALL_FAMILY
        value = epsilon(deltas, settings.quantile, small, settings.epsilon_floor)
        stats["rmt"][f] = {"null_deltas": deltas, "small_family": small,
                           "quantile": 1.0 if small else settings.quantile, "epsilon": value}
        eps[f] = _round_up(value, 3)
    largest = max(r.max_abs_change for r in runs)
    limit = module_limit(largest, settings.limit_factor)
    stats["spectral"]["module_change_limit"] = {"largest_null_change": largest,
                                                "factor": settings.limit_factor,
                                                "limit": limit}
    rows = [r.row() for r in runs]
    modules = [m for r in runs for m in r.rmt_modules]
    if modules:
        tau = rmt_null.null_tau(modules)
        stats["rmt_null"] = {"null_tau": tau.tau, "largest": tau.largest, "run": tau.run,
                             "modules": len(modules)}
    stats["variance"] = ve_statistics(rows, settings)
    stats["windows"] = window_statistics(rows, settings)
    overrides: dict[str, Any] = {"guards": {
        "spectral": {"family_caps": caps, "module_change_limit": limit},
        "rmt": {"epsilon_by_family": eps},
    }}
    if "rmt_null" in stats:
        overrides["guards"]["rmt"]["null_tau"] = stats["rmt_null"]["null_tau"]
    chosen = stats["variance"].get("min_effect_lognll")
    if chosen is not None:
        overrides["guards"]["variance"] = {"gating": {
            "min_effect_lognll": _round_up_significant(chosen)}}
    return Calibration(overrides, stats, rows, modules, [v for r in runs for v in r.ve_rows])


def window_statistics(rows: Sequence[Mapping[str, Any]], settings: Settings) -> dict[str, Any]:
    """The primary metric's per-window σ_Δ pooled within runs (`sigma_delta` over `windows`
    of each row: what an interval on one edit sees) and the windows it asks for."""
    sigma = pooled_sd([r.get("sigma_delta") for r in rows],
                      [int(r.get("windows") or 0) for r in rows])
    if sigma is None:
        return {"target_half_width": settings.half_width,
                "note": "no run recorded its per-window deltas"}
    return {"sigma_delta": sigma, "target_half_width": settings.half_width,
            "recommended_per_set": windows_for_half_width(sigma, settings.half_width,
                                                          settings.alpha)}


def ve_statistics(rows: Sequence[Mapping[str, Any]], settings: Settings) -> dict[str, Any]:
    """VE's σ_Δ pooled over the runs whose gate ran and moved the loss (`ve_sigma_delta`,
    `ve_windows`, `ve_max_abs_delta` of each row; a row without the largest |Δ| counts as
    moved) and the minimum effect both ways; without such runs, a note and no minimum
    effect."""
    base: dict[str, Any] = {"windows": settings.windows, "alpha": settings.alpha,
                            "sided": settings.sided}
    if not any("ve_windows" in r for r in rows):
        return {**base, "note": "these reference runs did not record VE's paired delta; the "
                                "minimum effect is not calibrated"}
    ran = [r for r in rows if int(r.get("ve_windows") or 0) > 1]
    moved = [r for r in ran if r.get("ve_max_abs_delta") is None
             or float(r["ve_max_abs_delta"]) > VE_NO_EFFECT]
    sigma = pooled_sd([r.get("ve_sigma_delta") for r in moved],
                      [int(r["ve_windows"]) for r in moved])
    base["runs_with_gate"] = len(moved)
    base["runs_without_effect"] = len(ran) - len(moved)
    if sigma is None:
        return {**base, "note": "no reference run proposed a VE rescale, so VE's paired "
                                "delta was never measured; the minimum effect is not "
                                "calibrated"}
    one = min_effect(sigma, settings.windows, settings.alpha, "one-sided")
    two = min_effect(sigma, settings.windows, settings.alpha, "two-sided")
    return {**base, "sigma_delta": sigma, "one_sided": one, "two_sided": two,
            "min_effect_lognll": one if settings.sided == "one-sided" else two}
