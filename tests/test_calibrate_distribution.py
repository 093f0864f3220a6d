"""The distribution limits of every tier are recomputed from their committed zoo runs
(policies/calibration/distribution.csv): no benign run the primary metric passes is failed
by them, the coarse quants are caught, and a changed input row changes the limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from invarlock.calibration import distribution_limits as dl

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "policies" / "calibration" / "distribution.csv"


def _rows() -> list[dict]:
    return dl.read_rows(RUNS.read_text())


def _shipped() -> dict:
    return yaml.safe_load((REPO / "policies" / "tiers.yaml").read_text())


def test_every_tier_carries_the_limits_derived_from_the_committed_runs():
    rows = _rows()
    assert {r["model"] for r in rows} == {"demo", "smollm2"}
    derived = dl.derive(rows)
    for tier, values in _shipped().items():
        shipped = values["distribution"]
        assert shipped["kld_mean_upper"] == derived[tier]["kld_mean_upper"], tier
        assert shipped["same_top_p_lower"] == derived[tier]["same_top_p_lower"], tier
        assert shipped["kld_p99_upper"] is None, tier  # recorded, not limited (module doc)


def test_the_zoo_covers_every_benign_family_that_applies_on_both_models_and_five_demo_seeds():
    """Every benign family is recorded, the uncalibrated ones too (their rows show what the
    limits do to them); a family missing on a model is one that does not apply to it (the
    demo's GPT-2 MLP has no up/down pair to rescale)."""
    from invarlock.calibration import zoo
    from invarlock.calibration.zoo_run import BENIGN
    from tests.guardkit import demo_dir

    rows = _rows()
    recorded = {model: {r["family"] for r in rows if r["model"] == model
                        and r["kind"] == "benign"} for model in ("demo", "smollm2")}
    assert recorded["smollm2"] == set(BENIGN)
    assert recorded["demo"] <= set(BENIGN)
    for family in recorded["demo"]:
        assert {r["seed"] for r in rows if r["model"] == "demo"
                and r["family"] == family} >= {0, 1, 2, 3, 4}, family
    missing = sorted(set(BENIGN) - recorded["demo"])
    assert len(missing) <= 1, missing
    demo = demo_dir()
    if demo is None:
        pytest.skip("the bundled demo model is not installed")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo).eval()
    for family in missing:
        with pytest.raises(zoo.NotApplicable):
            zoo.BENIGN[family](model, 0)


def test_the_uncalibrated_families_are_recorded_but_no_part_of_the_null():
    """50% pruning without fine-tuning (zoo_run.UNCALIBRATED) is no reference: not even a run
    the primary metric passed would move the limits (`invarlock calibrate`, where the user
    names such a family as a reference, counts it)."""
    from invarlock.calibration.zoo_run import UNCALIBRATED

    assert dl.UNCALIBRATED == UNCALIBRATED
    rows = _rows()
    assert {r["family"] for r in rows} >= set(UNCALIBRATED)
    assert not [r for r in dl.benign(rows) if r["family"] in UNCALIBRATED]
    top = max(r["kld_mean_high"] for r in dl.benign(rows))
    first = next(r for r in rows if r["family"] in UNCALIBRATED)
    passed = [dict(r, primary_ok=True, kld_mean_high=2 * top) if r is first else r
              for r in rows]
    assert dl.derive(passed) == dl.derive(rows)
    assert dl.derive(passed, excluded=())["balanced"]["kld_mean_upper"] == dl.round_up(
        4 * top)


def test_a_user_reference_of_an_uncalibrated_family_calibrates():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Result:
        overrides: dict = field(default_factory=dict)

    cert = {"primary_metric": {"ratio": 1.01},
            "validation": {"not_catastrophic": True, "primary_metric_acceptable": True},
            "distribution": {"kld_mean": {"estimate": 0.01, "high": 0.012},
                             "same_top_p": {"estimate": 0.95, "low": 0.94},
                             "kld": {"p99": 0.1}, "tokens": 100}}
    result, stats = dl.calibrate(Result(), [("zoo:wanda:0", cert)], "balanced")
    assert stats["rows"][0]["family"] == "wanda"
    assert result.overrides["eval"]["distribution"] == {"kld_mean_upper": 0.024,
                                                        "same_top_p_lower": 0.88}


@pytest.mark.parametrize("tier", ["conservative", "balanced", "aggressive"])
def test_no_false_alarm_on_the_benign_zoo(tier):
    """A false alarm: a benign run the primary metric passes, failed by the limits."""
    limits = _shipped()[tier]["distribution"]
    null = dl.benign(_rows())
    assert len(null) >= 90
    assert [f"{r['model']}:{r['family']}:{r['seed']:.0f}" for r in null
            if not dl.decide(r, limits)] == []


def test_the_coarse_quants_are_caught_by_the_balanced_limits():
    """4-bit RTN without groups (SmolLM2) and 2-bit RTN (both models) fail the KLD gate."""
    limits = _shipped()["balanced"]["distribution"]
    rows = [r for r in _rows() if r["kind"] == "harmful" and r["kld_mean_high"] is not None]
    caught = {(r["model"], r["family"]) for r in rows if not dl.decide(r, limits)}
    assert {("smollm2", "rtn4"), ("smollm2", "rtn2_group"), ("demo", "rtn2_group")} <= caught
    # on the demo's 128-wide matrices a group of 128 is a whole row: rtn4 is the benign
    # rtn4_group, and no limit that passes that family can fail it (CALIBRATION.md)
    assert ("demo", "rtn4") not in caught
    assert all(not dl.decide(r, limits) for r in rows
               if r["family"] in ("scale3", "outlier_rows", "family_scale", "swap_layers"))


def test_the_vocabulary_attacks_against_the_balanced_limits():
    """Edits of embedding rows of tokens the windows never contain (CALIBRATION.md): a
    permutation moves probability between those tokens, which mean KLD sees (same top p
    hardly moves); spiked rows take the distribution over; zeroed rows leave mean KLD under
    0.01 and same top p near 100%: the rows guard is what catches them, not these limits."""
    limits = _shipped()["balanced"]["distribution"]
    rows = [r for r in _rows() if r["family"] in ("vocab_permute", "rows_zero", "rows_spike")]
    assert {(r["model"], r["family"]) for r in rows} == {
        (m, f) for m in ("demo", "smollm2") for f in ("vocab_permute", "rows_zero",
                                                       "rows_spike")}
    for r in rows:
        caught = not dl.decide(r, limits)
        assert caught == (r["family"] != "rows_zero"), (r["model"], r["family"], r["seed"])
        if r["family"] == "vocab_permute":
            assert r["same_top_p_low"] >= limits["same_top_p_lower"]
            assert r["kld_mean_high"] > limits["kld_mean_upper"]


def test_the_largest_benign_run_sets_the_limit():
    rows = _rows()
    top = max(dl.benign(rows), key=lambda r: r["kld_mean_high"])
    raised = [dict(r, kld_mean_high=2 * r["kld_mean_high"]) if r is top else r for r in rows]
    assert dl.derive(raised)["balanced"]["kld_mean_upper"] == dl.round_up(
        4 * top["kld_mean_high"])
    # a benign run the primary metric fails is no reference: it does not move the limit
    failed = [dict(r, primary_ok=False) if r is top else r for r in rows]
    assert dl.derive(failed)["balanced"]["kld_mean_upper"] < dl.derive(rows)["balanced"][
        "kld_mean_upper"]


def test_calibration_md_carries_the_recomputed_table():
    doc = (REPO / "policies" / "CALIBRATION.md").read_text()
    missing = [line for line in dl.table(_rows()) if line not in doc]
    assert missing == []


def test_garbled_rows_are_refused_with_their_line():
    header, first, *rest = RUNS.read_text().splitlines()
    with pytest.raises(ValueError, match=r"distribution\.csv:2: kld_mean must be a number"):
        cells = first.split(",")
        cells[6] = "O.01"
        dl.read_rows("\n".join([header, ",".join(cells), *rest]))
    with pytest.raises(ValueError, match="columns"):
        dl.read_rows("model,family\n")


def test_rounding_never_tightens_the_rule():
    assert dl.round_up(0.04432) == 0.045 and dl.round_up(0.045) == 0.045
    assert dl.round_down(0.7344) == pytest.approx(0.734) and dl.round_down(-0.2) == 0.0
