"""The whole-model limits are recomputed from their committed benign runs, and the demo
model's runs are measured again: a limit or an input row that changes fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from invarlock.calibration import wholemodel

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "policies" / "calibration" / "wholemodel.csv"


def test_round_up_keeps_two_significant_digits_and_never_goes_below():
    assert wholemodel.round_up(0.3641) == 0.37
    assert wholemodel.round_up(0.36) == 0.36
    assert wholemodel.round_up(0.2778) == 0.28
    assert wholemodel.round_up(0.0) == 0.0


def test_every_tier_carries_the_limits_derived_from_the_committed_runs():
    runs = wholemodel.read_runs(RUNS)
    models = {r["model"] for r in runs}
    assert models == {"tiny_gpt2", "tiny_llama", "demo"}
    assert {r["edit"] for r in runs} == set(wholemodel.benign_edits())
    limits = wholemodel.derive(runs)
    tiers = yaml.safe_load((REPO / "policies" / "tiers.yaml").read_text())
    for tier, values in tiers.items():
        guards = values["guards"]
        assert guards["rows"]["tau"] == limits["tau"], tier
        assert guards["spectral"]["edit_size_limit"] is None, tier  # recorded, see below
        assert guards["spectral"]["edit_along_data_limit"] == \
            limits["edit_along_data_limit"], tier
        assert guards["rows"]["mode"] == "gate", tier  # gated in every tier


def test_the_largest_benign_run_sets_each_limit():
    runs = wholemodel.read_runs(RUNS)
    top = max(runs, key=lambda r: float(r["max_row_change"]))
    raised = [dict(r) for r in runs]
    raised[runs.index(top)]["max_row_change"] = 2 * float(top["max_row_change"])
    assert wholemodel.derive(raised)["tau"] > wholemodel.derive(runs)["tau"]
    top = max(runs, key=lambda r: float(r["max_edit_along_data"]))
    raised = [dict(r) for r in runs]
    raised[runs.index(top)]["max_edit_along_data"] = 2 * float(top["max_edit_along_data"])
    assert wholemodel.derive(raised)["edit_along_data_limit"] > \
        wholemodel.derive(runs)["edit_along_data_limit"]


def test_gptq_is_in_the_null_largest_in_weight_space_and_not_along_the_data():
    """GPTQ's error feedback is the largest benign edit in weight space (which is why that
    size has no limit) and no larger than RTN's along the data (which is gated)."""
    runs = wholemodel.read_runs(RUNS)
    assert wholemodel.PENDING == ()
    gptq = [r for r in runs if r["edit"] == "gptq4"]
    assert {r["model"] for r in gptq} == {"tiny_gpt2", "tiny_llama", "demo"}
    top = max(runs, key=lambda r: float(r["max_edit_size"]))
    assert top["edit"] == "gptq4"
    along = max(runs, key=lambda r: float(r["max_edit_along_data"]))
    assert along["edit"] != "gptq4"
    def along_per_size(r: dict) -> float:
        return float(r["max_edit_along_data"]) / float(r["max_edit_size"])

    for r in gptq:  # RTN's error is about as large along the data as in weight space
        rtn = [q for q in runs if (q["model"], q["edit"], q["seed"]) ==
               (r["model"], "rtn4_group", r["seed"])]
        assert along_per_size(r) < 0.9 * along_per_size(rtn[0]), r["model"]


def test_the_demo_runs_are_measured_again(tmp_path):
    from invarlock.calibration import zoo
    from invarlock.data.corpus import demo_corpus_path
    from tests.guardkit import demo_dir, one_thread

    demo = demo_dir()
    if demo is None:
        pytest.skip("the bundled demo model is not installed")
    stored = {(r["edit"], int(r["seed"])): r for r in wholemodel.read_runs(RUNS)
              if r["model"] == "demo"}
    seed = 1
    text = demo_corpus_path()
    with one_thread():
        baseline = wholemodel.measure_baseline(demo, text)
        for name, edit in wholemodel.benign_edits().items():
            if (name, seed) not in stored:  # up/down pairs: the demo's GPT-2 MLP has no gate
                with pytest.raises(zoo.NotApplicable):
                    wholemodel.measure_edit(demo, text, edit, seed, baseline)
                continue
            again = wholemodel.measure_edit(demo, text, edit, seed, baseline)
            row = stored[(name, seed)]
            for key in ("max_row_change", "max_edit_size", "max_edit_along_data"):
                assert again[key] == pytest.approx(float(row[key]), rel=1e-3, abs=1e-6), (
                    name, key)
