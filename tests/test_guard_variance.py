"""Variance guard (VE): scale proposal rules and the predictive paired gate."""

from __future__ import annotations

import numpy as np
import pytest

from invarlock.guards import variance

POLICY = {"tap": "all", "targets": "all",
          "discovery": {"deadband": 0.02, "min_abs_adjust": 0.012, "max_scale_step": 0.03},
          "gating": {"sided": "one-sided", "min_effect_lognll": 0.001}}


def test_proposal_rules():
    base = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    subj = [1.01, 0.81, 1.21, 0.97, 1.0, 1.0]
    alpha = variance.propose_scales(base, subj, deadband=0.02, min_abs_adjust=0.012,
                                    max_scale_step=0.03)
    assert alpha[0] == 1.0                         # inside the deadband
    assert alpha[1] == pytest.approx(1.03)         # 1/0.9 clipped to the step
    assert alpha[2] == pytest.approx(0.97)         # 1/1.1 clipped
    assert alpha[3] == pytest.approx(1 / np.sqrt(0.97))  # small enough to apply as is
    assert alpha[5] == 1.0                         # undefined ratio: no proposal
    tiny = variance.propose_scales([1.0], [0.978], deadband=0.02, min_abs_adjust=0.012,
                                   max_scale_step=0.03)
    assert tiny[0] == 1.0                          # |α-1| = 0.011 < min_abs_adjust


def _measurements(shift: float, *, m2_subject: float = 0.81, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = np.full(24, 127)
    plain = tokens * rng.normal(3.0, 0.2, 24)
    scaled = plain + tokens * (shift + rng.normal(0, 0.0005, 24))
    mods = [{"name": f"h.{i}.mlp.c_proj", "family": "ffn", "m2_baseline": 1.0,
             "m2_subject": m2_subject} for i in range(2)]
    m = {"modules": mods}
    alpha = variance.proposal(m, POLICY)
    return {**m, "gate": {"window_ids": list(range(24)), "tokens": tokens.tolist(),
                          "nll_plain": plain.tolist(), "nll_scaled": scaled.tolist(),
                          "alpha": alpha.tolist(), "replicates": 300, "seed": 1,
                          "ci_alpha": 0.05}}


def test_gate_reports_when_equalisation_helps():
    d = variance.decide(_measurements(-0.01), POLICY)
    assert not d.passed and "would help" in d.reason
    assert d.summary["ci"][1] <= -0.001 and len(d.findings) == 2


def test_gate_passes_without_a_significant_effect():
    d = variance.decide(_measurements(0.0), POLICY)
    assert d.passed and d.summary["proposed"] == 2


def test_two_sided_records_a_regression_without_failing():
    """Improvement-only in both sidednesses: equalising that would make the subject worse
    (it relies on its changed variance, as pruned models do) is recorded, not a failure;
    an improvement still fails two-sided."""
    hurts = _measurements(+0.01)
    one = variance.decide(hurts, POLICY)
    assert one.passed and "regression" not in one.summary
    two = {**POLICY, "gating": {"sided": "two-sided", "min_effect_lognll": 0.001}}
    d = variance.decide(hurts, two)
    assert d.passed and "relies on its changed variance" in d.reason
    assert d.summary["regression"] is True and d.summary["ci"][0] >= 0.001
    helps = variance.decide(_measurements(-0.01), two)
    assert not helps.passed and "would help" in helps.reason


def test_no_proposal_needs_no_gate():
    m = {"modules": [{"name": "h.0.mlp.c_proj", "family": "ffn", "m2_baseline": 1.0,
                      "m2_subject": 1.005}], "gate": None}
    d = variance.decide(m, POLICY)
    assert d.passed and "deadband" in d.reason


def test_edited_moments_that_change_the_proposal_are_detected():
    m = _measurements(0.0)
    m["modules"][0]["m2_subject"] = 0.95  # α would now be 1/√0.95, not the 1.03 applied
    d = variance.decide(m, POLICY)
    assert not d.passed and "differ from the proposal" in d.reason


def test_proposal_without_gate_fails():
    m = _measurements(0.0)
    m["gate"] = None
    assert not variance.decide(m, POLICY).passed


def test_not_applicable_passes_and_not_measured_fails():
    assert variance.decide({"evaluated": False, "applicable": False, "why": "classifier"},
                           POLICY).passed
    assert not variance.decide({"evaluated": False, "why": "final set skipped"}, POLICY).passed


def test_targets_edited_modules_only_and_numbers_written_as_text():
    m = {"modules": [{"name": "h.0.mlp.c_proj", "family": "ffn", "m2_baseline": 1.0,
                      "m2_subject": 0.81, "edited": False},
                     {"name": "h.1.mlp.c_proj", "family": "ffn", "m2_baseline": 1.0,
                      "m2_subject": 0.81, "edited": True}]}
    assert variance.proposal(m, POLICY).tolist() == pytest.approx([1.03, 1.03])
    only = {**POLICY, "targets": "edited_modules_only"}
    assert variance.proposal(m, only).tolist() == pytest.approx([1.0, 1.03])
    text = {**POLICY, "discovery": {"deadband": "2e-2", "min_abs_adjust": "0.012",
                                    "max_scale_step": "3e-2"}}
    assert variance.proposal(m, text).tolist() == pytest.approx([1.03, 1.03])
    assert variance.tapped_families("post mlp.c_proj (pre-residual)") == ("ffn",)
    with pytest.raises(ValueError, match="targets"):
        variance.proposal(m, {**POLICY, "targets": "some"})
