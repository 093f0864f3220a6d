"""Tests for invarlock.gate: upper-bound gating, catastrophe stop, drift, accuracy, verdict."""

from __future__ import annotations

import numpy as np
import pytest

from invarlock import gate
from invarlock.enums import MetricKind
from invarlock.policy import BootstrapPolicy, PrimaryMetricPolicy

POLICY = PrimaryMetricPolicy(ratio_limit=1.10, accuracy_delta_min_pp=-1.0,
                             catastrophic_ratio=2.0, drift_band=(0.95, 1.05))
BOOT = BootstrapPolicy(replicates=400, alpha=0.05, seed=0)


def _ppl_set(shift: float, noise: float, n: int = 60, seed: int = 0) -> gate.PairedArrays:
    rng = np.random.default_rng(seed)
    tokens = np.full(n, 100, dtype=np.int64)
    base = tokens * rng.normal(3.0, 0.3, n)
    subj = base + tokens * (shift + rng.normal(0, noise, n))
    return gate.PairedArrays(tokens, base, subj)


def test_gate_uses_upper_bound_not_point_estimate():
    """A point ratio under the limit whose CI reaches above it must FAIL."""
    final = _ppl_set(shift=np.log(1.08), noise=0.15, seed=1)
    preview = _ppl_set(shift=np.log(1.08), noise=0.15, seed=2)
    result = gate.primary_metric(MetricKind.PPL_CAUSAL, preview, final, POLICY, BOOT)
    assert result.ratio < POLICY.ratio_limit < result.ratio_ci[1]
    checks = {c.flag: c for c in gate.primary_checks(result, POLICY)}
    assert not checks["primary_metric_acceptable"].passed
    assert "upper bound" in checks["primary_metric_acceptable"].reason


def test_small_degradation_with_tight_interval_passes():
    preview, final = _ppl_set(0.01, 0.005, seed=3), _ppl_set(0.01, 0.005, seed=4)
    result = gate.primary_metric(MetricKind.PPL_CAUSAL, preview, final, POLICY, BOOT)
    decision = gate.decide([gate.pairing_check(1.0, 0.0, 60, 60),
                            *gate.primary_checks(result, POLICY)], gate.PRIMARY_GATING)
    assert decision.verdict == "PASS"
    assert result.ratio_ci[0] <= result.ratio <= result.ratio_ci[1]


def test_catastrophic_preview_skips_final_and_fails():
    preview = _ppl_set(np.log(3.0), 0.01)
    summary = gate.summarize(MetricKind.PPL_CAUSAL, preview)
    assert gate.is_catastrophic(MetricKind.PPL_CAUSAL, summary, POLICY)
    result = gate.primary_metric(MetricKind.PPL_CAUSAL, preview, None, POLICY, BOOT)
    assert result.final is None and result.interval is None and result.catastrophic
    flags = {c.flag: c.passed for c in gate.primary_checks(result, POLICY)}
    assert flags == {"not_catastrophic": False, "primary_metric_acceptable": False,
                     "preview_final_drift_acceptable": False}


def test_nonfinite_subject_losses_are_catastrophic():
    preview = _ppl_set(0.0, 0.01)
    preview.subject[3] = np.nan
    summary = gate.summarize(MetricKind.PPL_CAUSAL, preview)
    assert summary.ratio is None
    assert gate.is_catastrophic(MetricKind.PPL_CAUSAL, summary, POLICY)


def test_drift_outside_band_fails_even_when_ratio_passes():
    preview, final = _ppl_set(0.0, 0.002, seed=5), _ppl_set(0.07, 0.002, seed=6)
    result = gate.primary_metric(MetricKind.PPL_CAUSAL, preview, final, POLICY, BOOT)
    flags = {c.flag: c.passed for c in gate.primary_checks(result, POLICY)}
    assert result.drift == pytest.approx(np.exp(0.07), rel=0.01)
    assert flags["primary_metric_acceptable"] and not flags["preview_final_drift_acceptable"]


def test_accuracy_gates_on_lower_bound_of_paired_difference():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.8).astype(float)
    same = gate.PairedArrays(np.ones(400, dtype=np.int64), base, base.copy())
    worse_subj = base.copy()
    worse_subj[np.flatnonzero(base)[:20]] = 0.0  # 20 of 400 examples lost: -5 pp
    worse = gate.PairedArrays(np.ones(400, dtype=np.int64), base, worse_subj)
    ok = gate.primary_metric(MetricKind.ACCURACY, same, same, POLICY, BOOT)
    bad = gate.primary_metric(MetricKind.ACCURACY, worse, worse, POLICY, BOOT)
    assert ok.gate_value == 0.0 and ok.ratio_ci is None
    assert bad.interval.estimate == pytest.approx(-5.0)
    flags_ok = {c.flag: c.passed for c in gate.primary_checks(ok, POLICY)}
    flags_bad = {c.flag: c.passed for c in gate.primary_checks(bad, POLICY)}
    assert flags_ok["primary_metric_acceptable"] and not flags_bad["primary_metric_acceptable"]


def test_pairing_requires_full_match_no_overlap_equal_counts():
    assert gate.pairing_check(1.0, 0.0, 8, 8).passed
    assert not gate.pairing_check(0.99, 0.0, 8, 8).passed
    assert not gate.pairing_check(1.0, 0.125, 8, 8).passed
    assert not gate.pairing_check(1.0, 0.0, 8, 6).passed


def test_verdict_is_and_of_gating_flags_only():
    checks = [gate.Check("a", True, "fine"), gate.Check("b", False, "broken"),
              gate.Check("c", False, "monitor only")]
    assert gate.decide(checks, ["a"]).verdict == "PASS"
    failed = gate.decide(checks, ["a", "b"])
    assert failed.verdict == "FAIL" and failed.reasons == ("b: broken",)
    assert failed.validation == {"a": True, "b": False, "c": False}
    with pytest.raises(ValueError, match="without a check"):
        gate.decide(checks, ["zzz"])


# --- evidence against the profile's floor ---------------------------------------------------

def _evidence(profile: str, n: int, seq_len: int, replicates: int,
              requested: int | None = None, allow: bool = False) -> gate.Evidence:
    from invarlock.policy import evidence_floor

    req = n if requested is None else requested
    return gate.Evidence(evidence_floor(profile), n, n, seq_len, replicates, (req, req), allow)


def test_evidence_at_the_floor_meets_the_profile():
    check = _evidence("ci", 200, 512, 1200).check()
    assert check.flag == "evidence_meets_profile" and check.passed


@pytest.mark.parametrize(("n", "seq_len", "replicates", "shortfall"), [
    (199, 512, 1200, "final_n 199 < 200"),
    (200, 256, 1200, "seq_len 256 < 512"),
    (200, 512, 1199, "bootstrap replicates 1199 < 1200"),
])
def test_each_value_below_the_floor_fails_the_flag(n, seq_len, replicates, shortfall):
    check = _evidence("ci", n, seq_len, replicates, allow=True).check()
    assert not check.passed and shortfall in check.reason and "--allow-underpowered" in check.reason


def test_shrinking_to_fit_the_data_fails_the_flag_even_above_the_floor():
    evidence = _evidence("dev", 80, 128, 500, requested=100)
    assert evidence.shrunk and not evidence.meets_profile
    assert "shrunk to fit the data (80+80 of 100+100 requested)" in evidence.check().reason


def test_the_evidence_flag_gates_only_in_release():
    from invarlock.policy import evidence_floor

    assert "evidence_meets_profile" in gate.primary_gating(evidence_floor("release"))
    for profile in ("dev", "ci"):
        assert gate.primary_gating(evidence_floor(profile)) == gate.PRIMARY_GATING
    under = _evidence("release", 12, 512, 3200, allow=True)
    decision = gate.decide([under.check()], ["evidence_meets_profile"])
    assert decision.verdict == "FAIL" and "evidence below the release" in decision.reasons[0]
