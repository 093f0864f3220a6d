"""Spectral guard: did any weight matrix's largest singular value move abnormally?

For every 2-D weight in scope the probe measures σ_b = ‖W_b‖₂ (baseline) and σ_s = ‖W_s‖₂
(subject) and the edit size ‖W_s − W_b‖₂ / σ_b; for a block linear with an input sketch also
its gain along the data, σ_max(W·C̃^½) with C̃ the baseline's sampled inputs' second moment
(`invarlock.guards.measure.sketch`). Here, with numpy only:

- relative change r = σ_s/σ_b − 1 per module, of the gain along the data where the module
  has one (`sigma_basis: data`), else of the weight-space σ: GPTQ's error feedback can
  triple a matrix's weight-space σ on inputs the text never drives while its outputs stay
  put, a change no gate should call damage (the weight-space change stays in the record);
- robust z within each family (attn, ffn, embed, other): z = (r − median) / s, where s is the
  `sigma_quantile` quantile of |r − median| divided by Φ⁻¹((1 + q)/2), the same quantile of a
  standard normal's |Z|, so q = 0.5 gives the MAD-based σ (Hampel 1974) and q = 0.95 a
  scale that a few outliers cannot shrink; s is at least 1% of the deadband;
- a *candidate* is a module with |r| > `deadband` (a practically relevant change) and
  |z| > κ_f (`family_caps`, calibrated by `invarlock calibrate`);
- families are screened for significance: a family's p-value is the Bonferroni-adjusted
  two-sided normal tail of its most extreme candidate, min(1, M_f · 2Φ(−|z|)), and the m
  families are tested with Benjamini–Hochberg (1995) or Bonferroni at `alpha`;
- a candidate in a rejected family is a *violation*: one is enough to fail, because a single
  blown-up layer is exactly the damage the primary metric can miss; other candidates are
  *warnings*, and more than `max_caps` of them fail (the WARN budget);
- every module is also compared with its own baseline: |r| > `module_change_limit` is a
  violation whatever the family's spread, so a change shared by a whole family (every
  attention matrix ×1.5), which the robust z normalises away, is still caught;
- with `max_spectral_norm` set, any σ_s above it is a violation too;
- with `edit_size_limit` set, a module whose edit size ‖W_s − W_b‖₂/σ_b exceeds it is a
  violation: spiking a matrix can keep σ (and so r) where it was, but not the size of the
  edit, which benign quantization keeps small (calibrated: CALIBRATION.md);
- with `edit_along_data_limit` set, a module whose edit along the baseline's inputs,
  ‖ΔW·X‖_F/‖W_b·X‖_F (X: the calibration windows' input sketch,
  `invarlock.guards.measure.sketch`), exceeds it is a violation: a permutation or swap of
  rows moves the outputs the data produces by about as much as the outputs themselves, while
  GPTQ's error feedback, large in weight space, keeps this small by construction;
- the robust z of a family is taken over the modules the edit touched (r ≠ 0): a LoRA merge
  into q/v leaves o untouched, and those zeros would shrink the scale to nothing; a family
  with fewer than `MIN_FAMILY_FOR_Z` touched modules (embeddings: one or two matrices; one
  blown-up layer) has no reference to compare a module with: z is 0 there, and any change
  beyond the deadband is a violation.

σ is taken of each weight's effective form (the probe folds the scale of the norm feeding
it in and balances function-preserving channel pairs: q/k per key head and rotary pair,
v→o, up→down, the value channels of fused q/k/v; `invarlock.guards.measure.fold`), so a
reparametrisation that leaves the function unchanged (SmoothQuant/AWQ scales between a norm
and its linears or across a pair, SmoothAttention's q/k scales) leaves r at 0.
A guard that matched no module at all fails ("not measured"): silence is not evidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri

from invarlock.guards.base import BuiltinGuard, GuardDecision, Stage, unmeasured_decision

NAME = "spectral"
FLAG = "spectral_stable"
FAMILIES = ("attn", "ffn", "embed", "other")
# Below this the robust scale of relative changes is numerical noise (float32 σ has ~1e-7
# relative precision, the power iteration stops at 1e-7): a function-preserving edit leaves
# changes of that size, and a smaller scale would turn them into huge z.
SCALE_FLOOR = 1e-6
# ...and the scale is at least this fraction of the deadband: a family whose changes spread
# by less than 1% of the smallest change that matters is no yardstick (an fp16 round trip
# moves σ by 1e-6..1e-3, and z of 500 among such changes says nothing about damage).
DEADBAND_SCALE_FRACTION = 0.01
MIN_FAMILY_FOR_Z = 3


def relative_change(sigma_baseline: np.ndarray, sigma_subject: np.ndarray) -> np.ndarray:
    """r = σ_s/σ_b − 1; a zero baseline norm gives 0 if the subject's is zero too, else inf."""
    base = np.asarray(sigma_baseline, dtype=np.float64)
    subj = np.asarray(sigma_subject, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = subj / base - 1.0
    r[(base == 0) & (subj == 0)] = 0.0
    r[(base == 0) & (subj != 0)] = np.inf
    return r


def robust_scale(r: np.ndarray, sigma_quantile: float, floor: float = SCALE_FLOOR) -> float:
    """Normal-equivalent σ from the q-quantile of |r − median| (q = 0.5: MAD/0.6745)."""
    if not 0.0 < sigma_quantile < 1.0:
        raise ValueError(f"sigma_quantile must lie in (0, 1), got {sigma_quantile}")
    r = np.asarray(r, dtype=np.float64)
    finite = r[np.isfinite(r)]
    if finite.size == 0:
        return floor
    dev = np.abs(finite - np.median(finite))
    q = float(np.quantile(dev, sigma_quantile))
    return max(q / float(ndtri(0.5 + sigma_quantile / 2.0)), floor)


def robust_z(r: np.ndarray, sigma_quantile: float, floor: float = SCALE_FLOOR) -> np.ndarray:
    """Robust z of each module's relative change within one family."""
    r = np.asarray(r, dtype=np.float64)
    finite = r[np.isfinite(r)]
    if finite.size == 0:
        return np.where(np.isnan(r), 0.0, np.inf)
    z = (r - np.median(finite)) / robust_scale(r, sigma_quantile, floor)
    return np.nan_to_num(z, nan=0.0, posinf=np.finfo(np.float64).max,
                         neginf=-np.finfo(np.float64).max)


def two_sided_p(z: np.ndarray) -> np.ndarray:
    """2Φ(−|z|): the normal tail probability of a robust z at least this extreme."""
    return 2.0 * ndtr(-np.abs(np.asarray(z, dtype=np.float64)))


def rejected(p_values: Sequence[float], alpha: float, method: str, m: int) -> np.ndarray:
    """Which hypotheses are rejected at level `alpha` among `m` (>= len(p_values)).

    bh: Benjamini–Hochberg step-up (1995), reject the k smallest p with p_(k) <= k·α/m;
    bonferroni: reject p <= α/m.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = max(int(m), p.size)
    if p.size == 0:
        return np.zeros(0, dtype=bool)
    if method == "bonferroni":
        return p <= alpha / m
    if method != "bh":
        raise ValueError(f"multiple_testing.method must be 'bh' or 'bonferroni', got {method!r}")
    order = np.argsort(p, kind="stable")
    thresholds = alpha * np.arange(1, p.size + 1) / m
    below = np.nonzero(p[order] <= thresholds)[0]
    out = np.zeros(p.size, dtype=bool)
    if below.size:
        out[order[: below[-1] + 1]] = True
    return out


@dataclass(frozen=True)
class ModuleScore:
    name: str
    family: str
    r: float
    z: float
    sigma_baseline: float
    sigma_subject: float
    edit_size: float
    along_data: float | None = None  # edit size along the baseline's inputs (None: unmeasured)
    basis: str = "weights"  # r is σ's change in weight space, or along the data
    weight_r: float = 0.0   # σ's change in weight space (= r where basis is weights)


def scale_floor(deadband: float) -> float:
    """The smallest robust scale a z is divided by (see `DEADBAND_SCALE_FRACTION`)."""
    return max(SCALE_FLOOR, DEADBAND_SCALE_FRACTION * float(deadband))


def score_modules(modules: Sequence[Mapping[str, Any]], sigma_quantile: float,
                  scope: Sequence[str], floor: float = SCALE_FLOOR) -> list[ModuleScore]:
    """r and robust z for the measured modules whose family is in scope."""
    chosen = [m for m in modules if m["family"] in scope]
    out: list[ModuleScore] = []
    for family in FAMILIES:
        members = [m for m in chosen if m["family"] == family]
        if not members:
            continue
        weight_r = relative_change(np.array([_sigma(m["sigma_baseline"]) for m in members]),
                                   np.array([_sigma(m["sigma_subject"]) for m in members]))
        data = [_on_data(m) for m in members]
        r = weight_r.copy()
        along = [m for m, d in zip(members, data, strict=True) if d]
        if along:
            r[np.array(data)] = relative_change(
                np.array([_sigma(m["sigma_data_baseline"]) for m in along]),
                np.array([_sigma(m["sigma_data_subject"]) for m in along]))
        # the reference is the modules the edit touched: untouched ones (r exactly 0, e.g.
        # the output projections of a LoRA merge into q/v) would shrink the scale to nothing
        touched = r != 0
        z = np.zeros_like(r)
        if touched.sum() >= MIN_FAMILY_FOR_Z:
            z[touched] = robust_z(r[touched], sigma_quantile, floor)
        for m, ri, zi, wi, d in zip(members, r, z, weight_r, data, strict=True):
            out.append(ModuleScore(m["name"], family, float(ri), float(zi),
                                   _sigma(m["sigma_baseline"]), _sigma(m["sigma_subject"]),
                                   _sigma(m.get("edit_size", 0.0)),
                                   _optional(m.get("edit_along_data")),
                                   "data" if d else "weights", float(wi)))
    return out


def _on_data(m: Mapping[str, Any]) -> bool:
    """Whether a module's σ is gated along the data: measured there, with its baseline."""
    base = m.get("sigma_data_baseline")
    return m.get("sigma_basis") == "data" and isinstance(base, int | float) and base > 0 \
        and "sigma_data_subject" in m


def _sigma(x: Any) -> float:
    """A stored norm; None (not finite when measured) reads as inf."""
    return float("inf") if x is None else float(x)


def _optional(x: Any) -> float | None:
    return None if x is None else float(x)


def _json(x: float) -> float | None:
    """Derived numbers go to JSON, which has no inf/NaN."""
    return float(x) if np.isfinite(x) else None


def _scope(policy: Mapping[str, Any]) -> tuple[str, ...]:
    scope = policy.get("scope", "all")
    if scope == "all":
        return FAMILIES
    if isinstance(scope, str):
        scope = [scope]
    unknown = [s for s in scope if s not in FAMILIES]
    if unknown:
        raise ValueError(f"spectral scope has unknown families: {', '.join(unknown)}")
    return tuple(scope)


def decide(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> GuardDecision:
    """Candidates, family screen, violations and the WARN budget (see the module docstring)."""
    skipped = unmeasured_decision(measurements)
    if skipped is not None:
        return skipped
    scores = score_modules(measurements["modules"], float(policy["sigma_quantile"]),
                           _scope(policy), scale_floor(float(policy["deadband"])))
    if not scores:
        unmatched = list(measurements.get("unmatched") or [])
        listed = f" (unmatched: {', '.join(unmatched[:5])})" if unmatched else ""
        return GuardDecision(False, f"not measured: no module matched in scope "
                                    f"{', '.join(_scope(policy))}{listed}")
    deadband = float(policy["deadband"])
    own_limit = policy.get("module_change_limit")
    caps = {f: float(v) for f, v in policy["family_caps"].items()}
    mt = policy["multiple_testing"]
    families = sorted({s.family for s in scores})
    sizes = {f: sum(1 for s in scores if s.family == f and s.r != 0) for f in families}
    small = {f for f in families if sizes[f] < MIN_FAMILY_FOR_Z}
    candidates = [s for s in scores if abs(s.r) > deadband and (
        s.family in small or abs(s.z) > caps[s.family])]
    family_p = {}
    for f in families:
        zs = [abs(s.z) for s in candidates if s.family == f]
        family_p[f] = 1.0 if not zs or f in small else min(
            1.0, sizes[f] * float(two_sided_p(max(zs))))
    reject = dict(zip(families, rejected([family_p[f] for f in families],
                                         float(mt["alpha"]), str(mt["method"]),
                                         int(mt.get("m", len(families)))), strict=True))
    violations = [s for s in candidates if reject[s.family] or s.family in small]
    warnings = [s for s in candidates if not reject[s.family] and s.family not in small]
    if own_limit is not None:
        beyond = [s for s in scores if abs(s.r) > max(float(own_limit), deadband)]
        violations += [s for s in beyond if s not in violations]
        warnings = [s for s in warnings if s not in beyond]
    limit = policy.get("max_spectral_norm")
    above = [] if limit is None else [s for s in scores if s.sigma_subject > float(limit)]
    edit_limit = policy.get("edit_size_limit")
    too_big = [] if edit_limit is None else [
        s for s in scores if s.edit_size > float(edit_limit) and s not in violations]
    data_limit = policy.get("edit_along_data_limit")
    along = [] if data_limit is None else [
        s for s in scores if s.along_data is not None and s.along_data > float(data_limit)
        and s not in violations and s not in too_big]
    too_big += along
    above += [s for s in too_big if s not in above]
    warnings = [s for s in warnings if s not in too_big]

    findings = [_finding(s, "violation", _why(s, caps[s.family], s.family in small,
                                              own_limit)) for s in violations]
    findings += [_finding(s, "violation", f"σ {s.sigma_subject:.4g} above max_spectral_norm "
                          f"{float(limit):.4g}") for s in above if s not in too_big]
    findings += [_finding(s, "violation", _edit_why(s, edit_limit, data_limit))
                 for s in too_big]
    findings += [_finding(s, "warning", f"{_sigma_name(s)} changed {s.r:+.1%} (z {s.z:+.1f} > κ "
                          f"{caps[s.family]:.2f}, family not significant)") for s in warnings]
    max_caps = int(policy["max_caps"])
    passed = not violations and not above and len(warnings) <= max_caps
    if violations or above:
        worst = max([*violations, *above], key=lambda s: abs(s.r))
        reason = (f"{len(violations) + len(above)} violation(s); largest: {worst.name} "
                  f"{_sigma_name(worst)} {worst.r:+.1%} vs baseline")
        if too_big and all(s in too_big for s in [*violations, *above]):
            worst = max(too_big, key=lambda s: _edit_excess(s, edit_limit, data_limit))
            reason = (f"{len(too_big)} violation(s); largest: {worst.name} "
                      f"{_edit_why(worst, edit_limit, data_limit)}")
    elif len(warnings) > max_caps:
        reason = f"{len(warnings)} warnings exceed the budget max_caps = {max_caps}"
    else:
        top = max(scores, key=lambda s: abs(s.r))
        reason = (f"{len(scores)} matrices, no violation, {len(warnings)} warning(s) within "
                  f"budget {max_caps}; largest change {top.r:+.2%} ({top.name})")
    summary = {"modules": len(scores), "violations": len(violations) + len(above),
               "warnings": len(warnings), "families": {}}
    for f in families:
        members = [s for s in scores if s.family == f]
        top = max(members, key=lambda s: abs(s.z))
        summary["families"][f] = {
            "modules": len(members), "touched": sizes[f], "kappa": caps[f],
            "p_value": family_p[f],
            "rejected": bool(reject[f]), "robust_z": f not in small, "top_z": _json(top.z),
            "top_module": top.name,
            "max_abs_change": _json(max(abs(s.r) for s in members)),
            "max_abs_change_weights": _json(max(abs(s.weight_r) for s in members)),
            "along_the_data": sum(1 for s in members if s.basis == "data"),
        }
    return GuardDecision(passed, reason, tuple(findings), summary)


def _sigma_name(s: ModuleScore) -> str:
    return "σ along the data" if s.basis == "data" else "σ"


def _why(s: ModuleScore, kappa: float, small: bool, own_limit: Any = None) -> str:
    what = _sigma_name(s)
    if own_limit is not None and abs(s.r) > float(own_limit):
        return (f"{what} changed {s.r:+.1%} vs its own baseline, beyond the module limit "
                f"{float(own_limit):.0%}")
    if small:
        return (f"{what} changed {s.r:+.1%}, beyond the deadband, in a family too small for "
                "a robust z")
    return f"{what} changed {s.r:+.1%} (z {s.z:+.1f} > κ {kappa:.2f}, family significant)"


def _edit_excess(s: ModuleScore, edit_limit: Any, data_limit: Any) -> float:
    """How far past its limit a module's edit is (the larger ratio of the two sizes)."""
    ratios = [0.0]
    if edit_limit is not None and float(edit_limit) > 0:
        ratios.append(s.edit_size / float(edit_limit))
    if data_limit is not None and float(data_limit) > 0 and s.along_data is not None:
        ratios.append(s.along_data / float(data_limit))
    return max(ratios)


def _edit_why(s: ModuleScore, edit_limit: Any, data_limit: Any) -> str:
    if edit_limit is not None and s.edit_size > float(edit_limit):
        return f"edit size ‖ΔW‖₂/σ {s.edit_size:.3g} beyond the limit {float(edit_limit):.3g}"
    return (f"edit size along the data ‖ΔW·X‖/‖W·X‖ {s.along_data:.3g} beyond the limit "
            f"{float(data_limit):.3g}")


def _finding(s: ModuleScore, kind: str, message: str) -> dict[str, Any]:
    return {"module": s.name, "family": s.family, "kind": kind, "message": message,
            "relative_change": _json(s.r), "basis": s.basis,
            "relative_change_weights": _json(s.weight_r), "z": _json(s.z),
            "sigma_baseline": _json(s.sigma_baseline),
            "sigma_subject": _json(s.sigma_subject), "edit_size": _json(s.edit_size),
            "edit_along_data": None if s.along_data is None else _json(s.along_data)}


SPECTRAL = BuiltinGuard(
    NAME, FLAG, (Stage.WEIGHTS,),
    measures=("largest singular value of every 2-D weight, baseline (streamed from its "
              "files) vs subject, after the subject is loaded"),
    decide_fn=decide, probe_path="invarlock.guards.measure.spectral:SpectralProbe")
