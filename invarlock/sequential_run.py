"""The final set evaluated in looks: score the subject up to the next look, decide, stop early.

The final windows are already a seeded permutation of the corpus's windows (the window plan),
so their planned order is the fixed shuffled evaluation order. The subject scores them in
blocks that end at the design's looks (`invarlock.sequential.Design`); after each block the
confidence sequence on the per-window differences decides PASS, FAIL or continue. At the
maximum (the profile's final_n) the fixed-design interval runs as without early stopping, at
the α the design left it.

The per-window difference is the subject's mean log-loss per token minus the baseline's
(perplexity), or the negated correctness difference in percentage points (accuracy), so that
in both cases "upper bound below the threshold" means PASS. Guards read the first
`calibration_windows` final windows, which every run scores: n_min is at least that many.

Pure numpy apart from the `score` callable the caller hands in; no model is touched here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import chi2

from invarlock import gate
from invarlock import sequential as sq
from invarlock.enums import MetricKind
from invarlock.errors import ConfigError
from invarlock.policy import BootstrapPolicy, ResolvedPolicy

log = logging.getLogger(__name__)

MIN_N_MIN = 25  # below this the asymptotic sequence is not trusted at all


@dataclass(frozen=True)
class SequentialOutcome:
    """What the looks found; the certificate's `sequential` section is built from it."""

    design: sq.Design
    threshold: float  # on the difference scale (log ratio limit, or −min pp for accuracy)
    sd_floor: float  # the preview differences' standard deviation
    differences: np.ndarray  # float64 [stopped_at], in evaluation order (NaN: a broken window)
    result: sq.SequentialResult | None  # None when a window broke before a look decided

    @property
    def stopped_at(self) -> int:
        return int(self.differences.size)

    @property
    def early(self) -> bool:
        """Decided by the sequence before the maximum (PASS or FAIL)."""
        return self.result is not None and self.result.decision is not sq.Decision.CONTINUE

    @property
    def reason(self) -> str:
        n, m = self.stopped_at, self.design.n_max
        if self.result is None:
            return f"stopped after {n} of {m} windows: the subject's outputs were not finite"
        look = self.result.looks[-1]
        if self.result.decision is sq.Decision.PASS:
            return (f"decided after {n} of {m} windows: PASS, upper bound {look.high:.6g} "
                    f"below the threshold {self.threshold:.6g}")
        if self.result.decision is sq.Decision.FAIL:
            return (f"decided after {n} of {m} windows: FAIL, lower bound {look.low:.6g} "
                    f"above the threshold {self.threshold:.6g}")
        return f"undecided after {n} of {m} windows: the fixed-design test decides"


def design_for(policy: ResolvedPolicy, final_n: int,
               preview_n: int | None = None) -> sq.Design | None:
    """The run's design from the policy's `sequential` section; None when it is off.

    `final_n` and `preview_n` are the planned set sizes: the design scores at most the
    section's `preview_n` preview windows (all of them when it names none). A set shrunk
    below n_min (dev, small data) runs the fixed design: there is nothing to save.
    """
    section = policy.section("sequential")
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"sequential.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    n_min = section.get("n_min")
    calibration = int((policy.values.get("guards") or {}).get("calibration_windows", 0) or 0)
    if not isinstance(n_min, int) or isinstance(n_min, bool) or n_min < MIN_N_MIN:
        raise ConfigError(f"sequential.n_min must be an integer >= {MIN_N_MIN}, got {n_min!r}")
    if n_min < calibration:
        raise ConfigError(f"sequential.n_min ({n_min}) is below guards.calibration_windows "
                          f"({calibration}): the guards read that many final windows")
    planned_preview = policy.windows.preview_n if preview_n is None else preview_n
    preview_cut = section.get("preview_n", planned_preview)
    if not isinstance(preview_cut, int) or isinstance(preview_cut, bool) or preview_cut < 2:
        raise ConfigError(f"sequential.preview_n must be an integer >= 2, got {preview_cut!r}")
    if n_min >= final_n:
        log.info("sequential design off: %d final windows leave no look before the maximum",
                 final_n)
        return None
    try:
        return sq.Design(alpha=policy.bootstrap.alpha, n_min=n_min, n_max=final_n,
                         step=int(section.get("step", 0)),
                         share=float(section.get("alpha_share", 0.0)),
                         preview_n=min(preview_cut, planned_preview))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sequential: {exc}") from None


def preview_needed(design: sq.Design | None, planned: int) -> int:
    """Preview windows scored: the design's cut, or the whole set without a design."""
    return planned if design is None or design.preview_n == 0 else min(design.preview_n,
                                                                        planned)


def final_needed_first(design: sq.Design | None, planned: int) -> int:
    """Final windows every run scores: up to the first look (the guards' calibration windows
    are among them), or the whole set without a design."""
    return planned if design is None else design.looks[0]


def threshold_for(kind: MetricKind, policy: ResolvedPolicy) -> float:
    """The limit on the difference scale that the bounds are compared with."""
    pm = policy.primary_metric
    if kind.is_perplexity:
        return math.log(pm.ratio_limit)
    return -pm.accuracy_delta_min_pp


def differences(kind: MetricKind, tokens: np.ndarray, baseline: np.ndarray,
                subject: np.ndarray) -> np.ndarray:
    """Per-window differences on the scale where lower is better for the subject."""
    tokens = np.asarray(tokens, dtype=np.float64)
    base, subj = np.asarray(baseline, dtype=np.float64), np.asarray(subject, dtype=np.float64)
    if kind.is_perplexity:
        return subj / tokens - base / tokens
    return -100.0 * (subj - base)


def sequence(design: sq.Design, threshold: float, sd_floor: float,
             x: np.ndarray) -> SequentialOutcome:
    """The decision on the differences scored so far (`x` ends at a look)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        return SequentialOutcome(design, threshold, sd_floor, x, None)
    return SequentialOutcome(design, threshold, sd_floor, x,
                             design.run(x, threshold=threshold, sd_floor=sd_floor))


def preview_floor(kind: MetricKind, tokens: np.ndarray, baseline: np.ndarray,
                  subject: np.ndarray) -> float:
    """σ̂ floor: a one-sided 95% upper confidence bound on the spread of the preview set's
    differences, s·√((n − 1)/χ²₀.₀₅(n − 1)) (0 when it is not finite).

    The bound, not s itself: the design scores few preview windows, and a floor that is
    itself underestimated half the time lets skewed subjects pass too often (lognormal at
    the limit, 32 preview windows: 0.8% with s, 0.4% with the bound, against α 0.5%)."""
    x = differences(kind, tokens, baseline, subject)
    if x.size < 2:
        return 0.0
    sd = float(np.std(x, ddof=1)) * math.sqrt((x.size - 1) / float(chi2.ppf(0.05, x.size - 1)))
    return sd if math.isfinite(sd) else 0.0


def evaluate_in_looks(score: Callable[[Any], Any], windows: Any, baseline: Any, kind: MetricKind,
                      design: sq.Design, threshold: float,
                      sd_floor: float) -> tuple[Any, SequentialOutcome]:
    """Score `windows` (the final WindowSet) in blocks ending at the looks and stop at the
    first look that decides; returns the subject's scores on the windows evaluated (a prefix
    of the plan) and the sequence.

    `baseline` is the baseline's results on the plan, or a callable giving its results on
    the first n windows (scoring them when needed): it is asked for each block before the
    subject scores it, so the baseline never runs past the look that decides."""
    upto_baseline = baseline if callable(baseline) else lambda n: head_scores(baseline, n)
    parts: list[Any] = []
    done = 0
    while True:
        upto = design.next_look(done)
        base = upto_baseline(upto)
        parts.append(score(window_range(windows, done, upto)))
        done = upto
        scores = concatenate(parts)
        x = differences(kind, base.tokens, base.values, scores.values)
        outcome = sequence(design, threshold, sd_floor, x)
        if outcome.result is None or outcome.early or done >= design.n_max:
            log.info("sequential: %s", outcome.reason)
            return scores, outcome


def window_range(windows: Any, lo: int, hi: int) -> Any:
    """Windows [lo, hi) of a WindowSet, in plan order."""
    def cut(a: Any) -> Any:
        return None if a is None else a[lo:hi]

    return dataclasses.replace(
        windows, name=f"{windows.name}[{lo}:{hi}]", window_ids=windows.window_ids[lo:hi],
        input_ids=windows.input_ids[lo:hi], attention_mask=windows.attention_mask[lo:hi],
        labels=cut(windows.labels), token_type_ids=cut(windows.token_type_ids),
        sha256=tuple(windows.sha256[lo:hi]))


def concatenate(parts: list[Any]) -> Any:
    """One WindowScores from consecutive blocks' scores."""
    first = parts[0]
    if len(parts) == 1:
        return first
    return dataclasses.replace(
        first,
        window_ids=np.concatenate([p.window_ids for p in parts]),
        sha256=tuple(h for p in parts for h in p.sha256),
        tokens=np.concatenate([p.tokens for p in parts]),
        values=np.concatenate([p.values for p in parts]),
        nonfinite_windows=sum(p.nonfinite_windows for p in parts),
        seconds=sum(p.seconds for p in parts),
        fed_sha256=tuple(h for p in parts for h in p.fed_sha256),
        distribution=_concatenated_distribution([p.distribution for p in parts]))


def _concatenated_distribution(parts: list[Any]) -> Any:
    """The blocks' token comparisons as one (None unless every block has one)."""
    if any(p is None for p in parts):
        return None
    return dataclasses.replace(parts[0], **{
        f.name: np.concatenate([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(parts[0])})


def head_scores(scores: Any, n: int) -> Any:
    """The first `n` windows of one model's results (WindowScores, or the cache's copy)."""
    if len(scores.window_ids) == n:
        return scores
    return dataclasses.replace(
        scores, window_ids=scores.window_ids[:n], sha256=tuple(scores.sha256[:n]),
        tokens=scores.tokens[:n], values=scores.values[:n],
        nonfinite_windows=int(np.count_nonzero(~np.isfinite(scores.values[:n]))),
        fed_sha256=tuple(scores.fed_sha256[:n]))


def fixed_bootstrap(bootstrap: BootstrapPolicy, design: sq.Design | None) -> BootstrapPolicy:
    """The fixed-design interval at the α the sequence left it (unchanged without a design)."""
    if design is None:
        return bootstrap
    return dataclasses.replace(bootstrap, alpha=design.alpha_fixed)


def evaluated(final: Any, n: int) -> Any:
    """The final WindowSet as far as it was evaluated (the pairing and the drift read it)."""
    return final if final.n == n else window_range(final, 0, n)


def primary_checks(pm: gate.PrimaryMetricResult, policy: Any,
                   outcome: SequentialOutcome | None) -> list[gate.Check]:
    """The primary-metric flags; a look that decided replaces the fixed interval's verdict
    (which is still computed on the windows evaluated, and shown)."""
    checks = gate.primary_checks(pm, policy)
    if outcome is None or not outcome.early:
        return checks
    assert outcome.result is not None
    ok = outcome.result.decision is sq.Decision.PASS
    return [gate.Check(c.flag, ok, f"sequential test {outcome.reason}")
            if c.flag == "primary_metric_acceptable" else c for c in checks]


def section(outcome: SequentialOutcome) -> dict[str, Any]:
    """The certificate's `sequential` section: enough to recompute every look."""
    result = outcome.result
    return {
        "design": outcome.design.as_dict(),
        "looks_planned": list(outcome.design.looks),
        "threshold": outcome.threshold,
        "sd_floor": outcome.sd_floor,
        "differences": [None if not math.isfinite(v) else float(v)
                        for v in outcome.differences],
        "looks": [] if result is None else [
            {"windows": lk.windows, "mean": lk.mean, "sd": lk.sd, "radius": lk.radius,
             "low": lk.low, "high": lk.high, "decision": lk.decision.value}
            for lk in result.looks],
        "stopped_at": outcome.stopped_at,
        "decision": "nonfinite" if result is None else result.decision.value,
        "early": outcome.early,
        "reason": outcome.reason,
    }
