"""The primary-metric gate: from per-window arrays and the policy to numbers, flags, reasons.

Pure functions over numpy arrays. `certify` calls them on fresh evaluation results and
`verify` calls the very same functions on the arrays stored in a certificate, so a
certificate's numbers and flags can be recomputed by anyone.

Rules (DESIGN "Metrics and statistics"):
- perplexity gates on the upper bound of the ratio CI: exp(CI_hi(Δ̄)) ≤ ratio_limit;
- accuracy gates on the lower bound of the paired difference: CI_lo(Δacc) ≥ min (pp);
- a preview ratio above `catastrophic_ratio` stops the run (final set not evaluated);
- drift ratio_final / ratio_preview must lie inside `drift_band`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from invarlock import stats
from invarlock.enums import MetricKind
from invarlock.policy import BootstrapPolicy, EvidenceFloor, PrimaryMetricPolicy


@dataclass(frozen=True)
class PairedArrays:
    """One window set's per-window results for both models (aligned by window)."""

    tokens: np.ndarray  # int64 [N] tokens scored per window (1 per example for accuracy)
    baseline: np.ndarray  # float64 [N] NLL sums (nats) or 0/1 correctness
    subject: np.ndarray  # float64 [N]; NaN where the subject's logits were non-finite

    @property
    def nonfinite(self) -> int:
        return int(np.count_nonzero(~np.isfinite(self.subject)))


@dataclass(frozen=True)
class SetSummary:
    """Corpus-level metric of each model on one window set."""

    baseline: float
    subject: float | None  # None when the subject's outputs were not finite
    ratio: float | None  # None also for accuracy against a baseline that scored 0

    def as_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "subject": self.subject, "ratio": self.ratio}


def summarize(kind: MetricKind, arrays: PairedArrays) -> SetSummary:
    """Perplexity (or accuracy) of both models on one set, and subject/baseline."""
    if kind.is_perplexity:
        base = stats.perplexity(arrays.baseline, arrays.tokens)
        if arrays.nonfinite:
            return SetSummary(base, None, None)
        subj = stats.perplexity(arrays.subject, arrays.tokens)
        return SetSummary(base, subj, subj / base)
    base_acc = float(np.mean(arrays.baseline))
    if arrays.nonfinite:
        return SetSummary(base_acc, None, None)
    subj_acc = float(np.mean(arrays.subject))
    ratio = subj_acc / base_acc if base_acc > 0 else (1.0 if subj_acc == 0 else None)
    return SetSummary(base_acc, subj_acc, ratio)


def is_catastrophic(kind: MetricKind, preview: SetSummary, policy: PrimaryMetricPolicy) -> bool:
    """Preview so bad that evaluating the final set would waste time: stop and FAIL.

    Accuracy: the subject kept less than 1/catastrophic_ratio of the baseline's accuracy
    (compared as a product, so a baseline that scored 0 cannot be lost further).
    """
    if preview.subject is None:  # non-finite subject outputs
        return True
    if kind.is_perplexity:
        return preview.ratio > policy.catastrophic_ratio
    return preview.subject * policy.catastrophic_ratio < preview.baseline


@dataclass(frozen=True)
class PrimaryMetricResult:
    kind: MetricKind
    preview: SetSummary
    final: SetSummary | None  # None when the run stopped after a catastrophic preview
    catastrophic: bool
    interval: stats.BootstrapInterval | None  # on Δ̄ (nats/token) or Δacc (pp), final set
    limit: float
    basis: str  # "ratio_ci_upper" | "delta_ci_lower"

    @property
    def ratio(self) -> float | None:
        return self.final.ratio if self.final else None

    @property
    def ratio_ci(self) -> tuple[float, float] | None:
        if self.interval is None or not self.kind.is_perplexity:
            return None
        return (float(np.exp(self.interval.low)), float(np.exp(self.interval.high)))

    @property
    def drift(self) -> float | None:
        if self.final is None or self.final.ratio is None or not self.preview.ratio:
            return None
        return self.final.ratio / self.preview.ratio

    @property
    def baseline_scored_zero(self) -> bool:
        """Accuracy only: the baseline got nothing right on a set, so ratios are undefined."""
        sets = [self.preview] + ([self.final] if self.final else [])
        return not self.kind.is_perplexity and any(s.baseline == 0.0 for s in sets)

    @property
    def gate_value(self) -> float | None:
        """The one number compared with the limit: ratio CI upper bound, or Δacc CI lower."""
        if self.interval is None:
            return None
        if self.kind.is_perplexity:
            return float(np.exp(self.interval.high))
        return self.interval.low

    def as_dict(self) -> dict[str, Any]:
        iv = self.interval
        return {
            "kind": str(self.kind),
            "preview": self.preview.as_dict(),
            "final": self.final.as_dict() if self.final else None,
            "ratio": self.ratio,
            "ratio_ci": list(self.ratio_ci) if self.ratio_ci else None,
            "delta": None if iv is None else {
                "estimate": iv.estimate, "ci": [iv.low, iv.high],
                "unit": "nats_per_token" if self.kind.is_perplexity else "percentage_points",
            },
            "limit": self.limit,
            "basis": self.basis,
            "gate_value": self.gate_value,
            "drift": self.drift,
            "catastrophic": self.catastrophic,
            "bootstrap": None if iv is None else {
                "method": iv.method, "replicates": iv.replicates, "seed": iv.seed,
                "alpha": iv.alpha, "alpha_effective": iv.alpha_effective,
                "bounds_from": list(iv.bounds_from),
                "z0": _finite_or_none(iv.z0),
                "acceleration": iv.acceleration,
            },
        }


def primary_metric(
    kind: MetricKind,
    preview: PairedArrays,
    final: PairedArrays | None,
    policy: PrimaryMetricPolicy,
    bootstrap: BootstrapPolicy,
) -> PrimaryMetricResult:
    """Point estimates, BCa interval on the final set, drift and the catastrophe check."""
    limit = policy.ratio_limit if kind.is_perplexity else policy.accuracy_delta_min_pp
    basis = "ratio_ci_upper" if kind.is_perplexity else "delta_ci_lower"
    prev = summarize(kind, preview)
    catastrophic = is_catastrophic(kind, prev, policy)
    if catastrophic or final is None:
        return PrimaryMetricResult(kind, prev, None, catastrophic, None, limit, basis)
    fin = summarize(kind, final)
    if final.nonfinite:
        return PrimaryMetricResult(kind, prev, fin, True, None, limit, basis)
    if kind.is_perplexity:
        interval = stats.paired_log_loss(
            final.baseline, final.subject, final.tokens, replicates=bootstrap.replicates,
            seed=bootstrap.seed, alpha=bootstrap.alpha,
        ).delta
    else:
        interval = stats.paired_accuracy(
            final.baseline, final.subject, replicates=bootstrap.replicates,
            seed=bootstrap.seed, alpha=bootstrap.alpha,
        ).difference_pp
    return PrimaryMetricResult(kind, prev, fin, False, interval, limit, basis)


@dataclass(frozen=True)
class Check:
    """One validation flag with the sentence that explains it."""

    flag: str
    passed: bool
    reason: str


def primary_checks(result: PrimaryMetricResult, policy: PrimaryMetricPolicy) -> list[Check]:
    """The primary-metric flags of `validation`, each with its reason."""
    checks = [_catastrophe_check(result, policy)]
    if result.interval is None or result.gate_value is None:
        why = ("not evaluated: the run stopped after the preview set" if result.final is None
               else f"subject produced non-finite {_outputs(result.kind)} on the final set")
        checks.append(Check("primary_metric_acceptable", False, f"primary metric {why}"))
        checks.append(Check("preview_final_drift_acceptable", False, f"drift {why}"))
        return checks
    value = result.gate_value
    if result.kind.is_perplexity:
        ok = value <= result.limit
        op = "<=" if ok else ">"
        reason = (f"ratio {result.ratio:.4f}, CI upper bound {value:.4f} {op} limit "
                  f"{result.limit:.2f}")
    else:
        ok = value >= result.limit
        op = ">=" if ok else "<"
        reason = (f"accuracy change {result.interval.estimate:+.2f} pp, CI lower bound "
                  f"{value:+.2f} pp {op} limit {result.limit:+.2f} pp")
    checks.append(Check("primary_metric_acceptable", ok, reason))
    lo, hi = policy.drift_band
    drift = result.drift
    if drift is None and result.baseline_scored_zero:
        checks.append(Check("preview_final_drift_acceptable", True,
                            "drift not defined: the baseline's accuracy is 0 on a set, so the "
                            "paired accuracy change alone gates"))
        return checks
    drift_ok = drift is not None and lo <= drift <= hi
    shown = "undefined" if drift is None else f"{drift:.4f}"
    checks.append(Check("preview_final_drift_acceptable", drift_ok,
                        f"drift final/preview {shown} {'within' if drift_ok else 'outside'} "
                        f"[{lo:.2f}, {hi:.2f}]"))
    return checks


def _outputs(kind: MetricKind) -> str:
    return "losses" if kind.is_perplexity else "outputs (NaN correctness)"


def _catastrophe_check(result: PrimaryMetricResult, policy: PrimaryMetricPolicy) -> Check:
    prev = result.preview
    if prev.subject is None:
        return Check("not_catastrophic", False,
                     f"subject produced non-finite {_outputs(result.kind)} on preview")
    if result.catastrophic and result.final is not None:
        return Check("not_catastrophic", False,
                     f"subject produced non-finite {_outputs(result.kind)} on final")
    bad = result.catastrophic
    if result.kind.is_perplexity:
        return Check("not_catastrophic", not bad,
                     f"preview ratio {prev.ratio:.3f} {'>' if bad else '<='} "
                     f"catastrophic limit {policy.catastrophic_ratio:.1f}")
    if prev.baseline == 0.0:
        return Check("not_catastrophic", True,
                     f"baseline preview accuracy is 0 (subject {prev.subject:.3f}): nothing "
                     "left to lose")
    return Check("not_catastrophic", not bad,
                 f"preview accuracy ratio {prev.ratio:.3f} "
                 f"{'<' if bad else '>='} {1 / policy.catastrophic_ratio:.2f}")


def pairing_match(planned: tuple[str, ...], baseline_fed: tuple[str, ...],
                  subject_fed: tuple[str, ...]) -> float:
    """Share of planned windows that both models were fed exactly (by per-window hash).

    A window counts only when the baseline's and the subject's fed hashes both equal the
    plan's; a missing or extra window on either side is a mismatch.
    """
    if not planned:
        return 0.0
    same = sum(p == b == s for p, b, s in zip(planned, baseline_fed, subject_fed, strict=False))
    if len(baseline_fed) != len(planned) or len(subject_fed) != len(planned):
        same = min(same, len(planned) - 1)
    return same / len(planned)


def pairing_check(match: float, overlap: float, preview_n: int, final_n: int) -> Check:
    """Both models saw identical windows, preview and final are disjoint, counts are equal."""
    ok = match == 1.0 and overlap == 0.0 and preview_n == final_n
    return Check("pairing_acceptable", ok,
                 f"pairing match {match:.2f}, overlap {overlap:.2f}, "
                 f"{preview_n}+{final_n} windows")


EVIDENCE_FLAG = "evidence_meets_profile"


@dataclass(frozen=True)
class Evidence:
    """The evidence a run collected, against the floor its profile promises.

    It falls short when a window count, the window length or the bootstrap replicates are
    below the floor (possible only in a profile that records shortfalls, or with
    `allow_underpowered`), when the window sets were shrunk to fit the data, or when the
    resolved policy weakens a tier or profile setting (`policy.weakened_settings`: a lower
    confidence level, fewer calibration windows, a higher limit, a guard off or in monitor).
    """

    floor: EvidenceFloor
    preview_n: int
    final_n: int
    seq_len: int
    replicates: int
    requested: tuple[int, int]  # (preview_n, final_n) the policy asked for
    allow_underpowered: bool
    context_length: int | None = None  # the model's, when it shortened the seq_len floor
    weakened: tuple[str, ...] = ()  # policy.weakened_settings of the resolved policy

    @property
    def shrunk(self) -> bool:
        return (self.preview_n, self.final_n) != self.requested

    @property
    def shortfalls(self) -> tuple[str, ...]:
        short = self.floor.shortfalls(preview_n=self.preview_n, final_n=self.final_n,
                                      seq_len=self.seq_len, replicates=self.replicates)
        if self.shrunk:
            short += (f"windows shrunk to fit the data ({self.preview_n}+{self.final_n} of "
                      f"{self.requested[0]}+{self.requested[1]} requested)",)
        return short + self.weakened

    @property
    def meets_profile(self) -> bool:
        return not self.shortfalls

    def check(self) -> Check:
        f = self.floor
        if self.meets_profile:
            return Check(EVIDENCE_FLAG, True,
                         f"evidence meets the {f.profile} profile: {self.preview_n}+"
                         f"{self.final_n} windows of {self.seq_len} tokens, {self.replicates} "
                         f"bootstrap replicates (floor {f.preview_n}+{f.final_n}, {f.seq_len}, "
                         f"{f.replicates})")
        why = " (--allow-underpowered)" if self.allow_underpowered else ""
        return Check(EVIDENCE_FLAG, False,
                     f"evidence below the {f.profile} profile{why}: "
                     + "; ".join(self.shortfalls))

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.floor.profile, "floor": self.floor.as_dict(),
            "actual": {"preview_n": self.preview_n, "final_n": self.final_n,
                       "seq_len": self.seq_len, "replicates": self.replicates},
            "requested": {"preview_n": self.requested[0], "final_n": self.requested[1]},
            "context_length": self.context_length, "below_floor": self.floor.below_floor,
            "gates": self.floor.gates, "allow_underpowered": self.allow_underpowered,
            "shrunk_to_fit": self.shrunk, "meets_profile": self.meets_profile,
            "shortfalls": list(self.shortfalls),
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


@dataclass(frozen=True)
class Decision:
    """The verdict: PASS iff every gating flag holds. Monitor-only flags are recorded only."""

    verdict: str  # "PASS" | "FAIL"
    validation: dict[str, bool]
    gating: tuple[str, ...]
    reasons: tuple[str, ...]
    explanations: dict[str, str]

    def verdict_section(self) -> dict[str, Any]:
        return {"status": self.verdict, "reasons": list(self.reasons),
                "explanations": dict(self.explanations)}


def decide(checks: list[Check], gating: list[str] | tuple[str, ...]) -> Decision:
    """AND of the gating flags; reasons name every failing gating check."""
    validation = {c.flag: bool(c.passed) for c in checks}
    missing = [g for g in gating if g not in validation]
    if missing:
        raise ValueError(f"gating flags without a check: {', '.join(missing)}")
    failed = [c for c in checks if c.flag in gating and not c.passed]
    if failed:
        reasons = tuple(f"{c.flag}: {c.reason}" for c in failed)
        status = "FAIL"
    else:
        reasons = (f"all {len(gating)} gating checks passed",)
        status = "PASS"
    return Decision(status, validation, tuple(gating), reasons,
                    {c.flag: c.reason for c in checks})


PRIMARY_GATING = (
    "pairing_acceptable",
    "not_catastrophic",
    "primary_metric_acceptable",
    "preview_final_drift_acceptable",
)


def primary_gating(floor: EvidenceFloor) -> tuple[str, ...]:
    """The primary gating flags; `evidence_meets_profile` too where the profile gates on it."""
    return (*PRIMARY_GATING, EVIDENCE_FLAG) if floor.gates else PRIMARY_GATING
