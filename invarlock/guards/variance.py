"""Variance guard (VE): would equalising the subject's output variance predictably help?

The probe records the second moment E[y²] of each block output projection (attention and
FFN outputs before the residual add) for both models on the preview windows. Here:

1. Scale proposal per module, ρ = E[y²]_subject / E[y²]_baseline (rules under `discovery`):
   no proposal when |ρ − 1| <= `deadband`; otherwise α = 1/√ρ clipped to
   [1 − max_scale_step, 1 + max_scale_step], dropped when |α − 1| < `min_abs_adjust`;
   with `targets: edited_modules_only`, only for modules whose own weights changed.
   `tap` chooses the projections observed: all, attn, ffn (the seed's
   "post mlp.c_proj (pre-residual)" means ffn).
2. Predictive paired gate, on calibration windows disjoint from the preview windows the
   proposal was fitted on: the subject scored with α applied through forward hooks against the
   subject as it is, per window. Δ = Σ(NLL_α − NLL)/Σ tokens with its BCa interval
   (invarlock.stats). Equalisation *helps* when CI_hi <= −min_effect and Δ <= −min_effect;
   two-sided, a CI_lo >= +min_effect is recorded as a regression (equalising would hurt: the
   subject depends on its changed variance, and VE stays off).
3. `variance_ok` is False when equalisation helps: the subject's activation variance moved
   away from the baseline's in a way the loss notices, and moving it back would repair it.
   Both sidednesses gate on improvement only (the calibration seed's "two-sided,
   improvement-only"); they differ in the minimum effect (z one- or two-sided). A regression
   is not damage: benign edits such as pruning shift variance in ways the subject then relies
   on. The subject is never modified; `certify --write-ve-subject DIR` writes a copy with α
   folded into the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from invarlock import stats
from invarlock.guards.base import BuiltinGuard, GuardDecision, Stage, unmeasured_decision

NAME = "variance"
FLAG = "variance_ok"
SIDES = ("one-sided", "two-sided")


def propose_scales(m2_baseline: Sequence[float], m2_subject: Sequence[float], *,
                   deadband: float, min_abs_adjust: float, max_scale_step: float) -> np.ndarray:
    """α per module (1.0 where no adjustment is proposed); see the module docstring."""
    base = np.asarray(m2_baseline, dtype=np.float64)
    subj = np.asarray(m2_subject, dtype=np.float64)
    alpha = np.ones_like(base)
    ok = (base > 0) & (subj > 0) & np.isfinite(base) & np.isfinite(subj)
    rho = np.ones_like(base)
    rho[ok] = subj[ok] / base[ok]
    move = ok & (np.abs(rho - 1.0) > deadband)
    alpha[move] = np.clip(1.0 / np.sqrt(rho[move]), 1.0 - max_scale_step, 1.0 + max_scale_step)
    alpha[np.abs(alpha - 1.0) < min_abs_adjust] = 1.0
    return alpha


@dataclass(frozen=True)
class GateResult:
    delta: float          # Σ(NLL_α − NLL)/Σ tokens, nats/token
    low: float
    high: float
    helps: bool
    hurts: bool           # only evaluated two-sided; recorded, never a failure
    method: str


def predictive_gate(nll_plain: Sequence[float], nll_scaled: Sequence[float],
                    tokens: Sequence[int], *, sided: str, min_effect: float,
                    replicates: int, seed: int, alpha: float) -> GateResult:
    """Paired ΔlogNLL of the α-scaled subject vs the subject, BCa over windows."""
    if sided not in SIDES:
        raise ValueError(f"variance gating.sided must be one of {SIDES}, got {sided!r}")
    plain = np.asarray(nll_plain, dtype=np.float64)
    scaled = np.asarray(nll_scaled, dtype=np.float64)
    iv = stats.bca_ratio_of_sums(scaled - plain, np.asarray(tokens, dtype=np.float64),
                                 replicates=replicates, seed=seed, alpha=alpha)
    helps = iv.high <= -min_effect and iv.estimate <= -min_effect
    hurts = sided == "two-sided" and iv.low >= min_effect
    return GateResult(iv.estimate, iv.low, iv.high, bool(helps), bool(hurts), iv.method)


TARGETS = ("all", "edited_modules_only")
# `tap` values: which block output projections are observed; the seed's wording is an alias.
TAPS = {"all": ("attn", "ffn"), "attn": ("attn",), "ffn": ("ffn",),
        "post mlp.c_proj (pre-residual)": ("ffn",)}


def tapped_families(tap: str) -> tuple[str, ...]:
    try:
        return TAPS[tap]
    except KeyError:
        raise ValueError(f"variance tap must be one of {', '.join(map(repr, TAPS))}, "
                         f"got {tap!r}") from None


def proposal(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> np.ndarray:
    """The α the policy proposes for the measured modules, in their stored order.

    `discovery` holds the proposal rules; with `targets: edited_modules_only` only modules
    whose own weights changed get a proposal.
    """
    modules = measurements["modules"]
    rules = policy["discovery"]
    targets = policy.get("targets", "all")
    if targets not in TARGETS:
        raise ValueError(f"variance targets must be one of {TARGETS}, got {targets!r}")
    nan = float("nan")  # a moment stored as None (not finite) gets no proposal
    alpha = propose_scales([nan if m["m2_baseline"] is None else m["m2_baseline"]
                            for m in modules],
                           [nan if m["m2_subject"] is None else m["m2_subject"]
                            for m in modules],
                           deadband=float(rules["deadband"]),
                           min_abs_adjust=float(rules["min_abs_adjust"]),
                           max_scale_step=float(rules["max_scale_step"]))
    if targets == "edited_modules_only":
        alpha[[not m.get("edited", True) for m in modules]] = 1.0
    return alpha


def decide(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> GuardDecision:
    """Recompute the proposal, check it is what the gate applied, then the gate itself."""
    skipped = unmeasured_decision(measurements)
    if skipped is not None:
        return skipped
    modules = list(measurements["modules"])
    if not modules:
        unmatched = list(measurements.get("unmatched") or [])
        listed = f" (unmatched: {', '.join(unmatched[:5])})" if unmatched else ""
        return GuardDecision(False, "not measured: no module matched (no block output "
                                    f"projection observed in both models){listed}")
    alpha = proposal(measurements, policy)
    moved = [(m, a) for m, a in zip(modules, alpha, strict=True) if a != 1.0]
    summary: dict[str, Any] = {"modules": len(modules), "proposed": len(moved)}
    findings = tuple(
        {"module": m["name"], "family": m["family"], "kind": "proposal",
         "message": f"second moment ×{m['m2_subject'] / m['m2_baseline']:.4f} vs baseline; "
                    f"proposed scale {a:.4f}", "alpha": float(a)}
        for m, a in moved)
    if not moved:
        return GuardDecision(True, f"{len(modules)} block outputs, none moved beyond the "
                                   f"deadband {float(policy['discovery']['deadband']):.3f}",
                             (), summary)
    gate = measurements.get("gate")
    if gate is None:
        return GuardDecision(False, "scales were proposed but the predictive gate was not "
                                    "evaluated", findings, summary)
    applied = np.asarray(gate["alpha"], dtype=np.float64)
    if applied.shape != alpha.shape or not np.allclose(applied, alpha, rtol=0, atol=1e-12):
        return GuardDecision(False, "the scales the gate applied differ from the proposal the "
                                    "measurements give", findings, summary)
    gating = policy["gating"]
    sided = str(gating["sided"])
    min_effect = float(gating["min_effect_lognll"])
    result = predictive_gate(gate["nll_plain"], gate["nll_scaled"], gate["tokens"],
                             sided=sided, min_effect=min_effect,
                             replicates=int(gate["replicates"]), seed=int(gate["seed"]),
                             alpha=float(gate["ci_alpha"]))
    summary.update({"delta": result.delta, "ci": [result.low, result.high],
                    "method": result.method, "sided": sided, "min_effect": min_effect,
                    "windows": len(gate["tokens"])})
    span = (f"ΔlogNLL {result.delta:+.5f} (CI {result.low:+.5f} to {result.high:+.5f}) on "
            f"{len(gate['tokens'])} windows, {len(moved)} module(s) rescaled")
    if result.helps:
        return GuardDecision(False, f"equalising variance would help: {span}, "
                                    f"below -{min_effect:g}", findings, summary)
    if result.hurts:  # recorded, not a failure: VE stays off, the subject is not damaged
        summary["regression"] = True
        return GuardDecision(True, f"equalising variance would hurt (the subject relies on "
                                   f"its changed variance; VE stays off): {span}, above "
                                   f"+{min_effect:g}", findings, summary)
    return GuardDecision(True, f"no significant effect of equalising variance: {span} "
                               f"({sided}, min effect {min_effect:g})", findings, summary)


VARIANCE = BuiltinGuard(
    NAME, FLAG, (Stage.ACTIVATIONS,),
    measures=("second moments of block output projections on the preview windows (taps), "
              "then a paired check of the proposed rescaling on the first K final windows"),
    decide_fn=decide, probe_path="invarlock.guards.measure.variance:VarianceProbe")
