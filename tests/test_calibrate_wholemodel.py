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
        assert guards["spectral"]["edit_size_limit"] == limits["edit_size_limit"], tier
        assert guards["rows"]["mode"] == "gate", tier  # gated in every tier


def test_the_largest_benign_run_sets_each_limit():
    runs = wholemodel.read_runs(RUNS)
    top = max(runs, key=lambda r: float(r["max_row_change"]))
    raised = [dict(r) for r in runs]
    raised[runs.index(top)]["max_row_change"] = 2 * float(top["max_row_change"])
    assert wholemodel.derive(raised)["tau"] > wholemodel.derive(runs)["tau"]


def test_the_demo_runs_are_measured_again(tmp_path):
    from invarlock.calibration import zoo
    from tests.guardkit import demo_dir, one_thread

    demo = demo_dir()
    if demo is None:
        pytest.skip("the bundled demo model is not installed")
    stored = {(r["edit"], int(r["seed"])): r for r in wholemodel.read_runs(RUNS)
              if r["model"] == "demo"}
    seed = 1
    with one_thread():
        for name, edit in wholemodel.benign_edits().items():
            if (name, seed) not in stored:  # up/down pairs: the demo's GPT-2 MLP has no gate
                with pytest.raises(zoo.NotApplicable):
                    wholemodel.measure_edit(demo, edit, seed)
                continue
            again = wholemodel.measure_edit(demo, edit, seed)
            row = stored[(name, seed)]
            for key in ("max_row_change", "max_edit_size"):
                assert again[key] == pytest.approx(float(row[key]), rel=1e-3, abs=1e-6), (
                    name, key)
