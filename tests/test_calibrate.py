"""Calibration: the recipe's statistics, the noise reference edit, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import norm

from invarlock.calibration import recipe
from tests import guardkit as kit


def _calibrate(baseline: Path, dataset: Path, tmp_path: Path, *args: str):
    """`invarlock calibrate` on the fast preset into tmp_path/cal, single-threaded."""
    from click.testing import CliRunner

    from invarlock.cli import main

    fast = tmp_path / "fast.yaml"
    fast.write_text(kit.FAST)
    with kit.one_thread():
        return CliRunner().invoke(main, [
            "calibrate", "--baseline", str(baseline), "--dataset", str(dataset),
            "--preset", str(fast), "--out", str(tmp_path / "cal"), "--json", *args],
            catch_exceptions=False)


def test_budget_split_by_family_size():
    # 120 modules, budget 5: B_f = floor(5 M_f / 120 + 0.5)
    assert recipe.budget_split(5, {"ffn": 40, "attn": 40, "embed": 8, "other": 32}) == {
        "ffn": 2, "attn": 2, "embed": 0, "other": 1}
    assert recipe.budget_split(3, {"attn": 120, "ffn": 90, "embed": 1}) == {
        "attn": 2, "ffn": 1, "embed": 0}


def test_kappa_order_statistic_and_parametric():
    # the B_f-th largest |z| plus the margin; over runs the largest
    runs = [[2.1, 1.8, 1.6, 1.5, 1.4], [1.2, 1.7, 0.3]]
    assert recipe.kappa_order_statistic(runs, 2, 0.1) == pytest.approx(1.9)
    assert recipe.kappa_order_statistic(runs, 0, 0.1) == pytest.approx(2.2)  # at least one
    assert recipe.kappa_order_statistic([[0.5]], 3, 0.0) == 0.5  # fewer modules than B_f
    assert recipe.kappa_parametric(40, 2, 0.1) == pytest.approx(norm.ppf(0.975) + 0.1)
    # on many normal samples the two rules agree
    rng = np.random.default_rng(0)
    z = [np.abs(rng.normal(size=4000)).tolist()]
    assert recipe.kappa_order_statistic(z, 100, 0.0) == pytest.approx(
        recipe.kappa_parametric(4000, 100, 0.0), abs=0.05)


def test_epsilon_min_effect_and_windows():
    deltas = list(np.linspace(-0.01, 0.04, 101))
    assert recipe.epsilon(deltas, 0.95, small=False, floor=0.01) == pytest.approx(0.0375 + 0.01)
    assert recipe.epsilon(deltas, 0.95, small=True, floor=0.01) == pytest.approx(0.05)
    assert recipe.epsilon([-0.02, -0.01], 0.95, small=False, floor=0.01) == pytest.approx(0.01)
    assert recipe.min_effect(0.02, 16, 0.05, "one-sided") == pytest.approx(
        norm.ppf(0.95) * 0.02 / 4)
    assert recipe.min_effect(0.02, 16, 0.05, "two-sided") == pytest.approx(
        norm.ppf(0.975) * 0.02 / 4)
    n = recipe.windows_for_half_width(0.02, 0.002, 0.05)
    assert n == int(np.ceil((norm.ppf(0.975) * 10) ** 2))
    assert norm.ppf(0.975) * 0.02 / np.sqrt(n) <= 0.002


def test_noise_edit_is_one_int8_step_per_channel_and_seeded(tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.calibration.perturb import NoisePlan, apply_noise

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    models = [AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir) for _ in range(3)]
    results = [apply_noise(m, NoisePlan(seed=s)) for m, s in zip(models, (0, 0, 1),
                                                                  strict=True)]
    assert results[0].modules_changed == results[2].modules_changed
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: output channels are columns
    w = base.state_dict()[name]
    diff = models[0].state_dict()[name] - w
    step = w.abs().amax(dim=0) / 127
    assert torch.all(diff.abs() <= step / 2 + 1e-7) and diff.abs().max() > step.max() / 4
    assert torch.equal(models[0].state_dict()[name], models[1].state_dict()[name])
    assert not torch.equal(models[0].state_dict()[name], models[2].state_dict()[name])
    assert torch.equal(models[0].state_dict()["transformer.wte.weight"],
                       base.state_dict()["transformer.wte.weight"])


def test_calibrate_writes_a_preset_that_certify_accepts(tiny_gpt2_dir, sonnets_path, tmp_path):
    result = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path, "--seeds", "2")
    fast, out = tmp_path / "fast.yaml", tmp_path / "cal"
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["runs"] == 3
    stats = json.loads((out / "calibration.json").read_text())
    assert stats["runs"] == ["quant_rtn:int8", "quant_noise:0", "quant_noise:1"]
    assert stats["spectral"]["attn"]["budget"] == 2 and "order_statistic" in stats["spectral"][
        "attn"]
    assert stats["spectral"]["embed"]["note"].startswith("too few modules")
    assert len((out / "calibration.csv").read_text().splitlines()) == 4
    preset = yaml.safe_load((out / "calibration.yaml").read_text())
    caps = preset["guards"]["spectral"]["family_caps"]
    assert caps["attn"] == pytest.approx(np.ceil(stats["spectral"]["attn"][
        "order_statistic"] * 100) / 100)
    for cert_path in stats["certificates"]:
        cert = json.loads(Path(cert_path).read_text())
        assert cert["guards"]["spectral"]["mode"] == "monitor"
    code, summary, cert = kit.certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                      "--dataset", str(sonnets_path), "--profile", "dev",
                                      "--preset", str(fast), "--preset",
                                      str(out / "calibration.yaml"), "--out", str(tmp_path / "c"))
    assert code == 0
    assert cert["policy"]["values"]["guards"]["spectral"]["family_caps"] == caps
    assert "guards.spectral.family_caps.attn" in cert["policy"]["overrides"]
    # --resume recomputes the statistics from the stored reference certificates
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    again = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path, "--seeds", "2", "--resume")
    assert again.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == before
    assert yaml.safe_load((out / "calibration.yaml").read_text()) == preset


def test_zoo_edits_are_seeded_and_do_what_they_say(tiny_llama_dir, tiny_gpt2_dir):
    """Independent zoo edits: same seed, same weights; norm folds keep the outputs; harmful
    edits change what they name."""
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.calibration import zoo, zoo_run

    assert set(zoo.BENIGN) == set(zoo_run.BENIGN) and set(zoo.HARMFUL) == set(zoo_run.HARMFUL)
    for model_dir in (tiny_llama_dir, tiny_gpt2_dir):
        def fresh(model_dir=model_dir):
            return AutoModelForCausalLM.from_pretrained(model_dir).eval()

        kit.check_zoo_edits(fresh, fold_atol=1e-4, harm_atol=1e-3)
        with torch.no_grad():
            pruned = fresh()
            result = zoo.prune(pruned, 3)
        sparsity = result.plan["sparsity"]
        assert 0.02 <= sparsity <= 0.10
        w = dict(pruned.named_modules())[result.modules_changed[0]].weight
        assert (w == 0).float().mean().item() == pytest.approx(sparsity, abs=0.01)


def test_shipped_tiers_recompute_from_the_committed_calibration():
    """Every calibrated number in policies/tiers.yaml follows from the calibration.json files
    committed next to CALIBRATION.md (with their .csv), by the documented rules."""
    from invarlock.calibration import tiers as derive_tiers
    from invarlock.policy import policies_dir

    root = policies_dir() / "calibration"
    calibrations = {}
    for path in sorted(root.glob("*/calibration.json")):
        stats = json.loads(path.read_text())
        rows = (path.parent / "calibration.csv").read_text().splitlines()
        assert len(rows) == 1 + len(stats["per_run"]), path
        calibrations[path.parent.name] = stats
    assert {"demo", "smollm2"} <= set(calibrations)
    shipped = yaml.safe_load((policies_dir() / "tiers.yaml").read_text())
    derived = derive_tiers.derive(calibrations, shipped)
    for tier, values in derived.items():
        guards = shipped[tier]["guards"]
        assert guards["spectral"]["family_caps"] == pytest.approx(values["family_caps"]), tier
        assert guards["spectral"]["module_change_limit"] == pytest.approx(
            values["module_change_limit"]), tier
        assert guards["variance"]["gating"]["min_effect_lognll"] == pytest.approx(
            values["min_effect_lognll"]), tier
        for family, slack in values["null_slack"].items():  # ε is chosen; it must cover
            assert guards["rmt"]["epsilon_by_family"][family] >= slack, (tier, family)


def test_calibrate_on_zoo_families_derives_the_module_limit(tiny_gpt2_dir, sonnets_path,
                                                            tmp_path):
    result = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path, "--edits", "normfold_all",
                        "--edits", "prune", "--seeds", "1")
    out = tmp_path / "cal"
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "calibration.json").read_text())
    assert stats["runs"] == ["zoo:normfold_all:0", "zoo:prune:0"]
    by_run = {r["run"]: r for r in stats["per_run"]}
    assert by_run["zoo:normfold_all:0"]["max_abs_change"] < 1e-4  # folded: σ unchanged
    limit = stats["spectral"]["module_change_limit"]
    assert limit["limit"] == pytest.approx(max(0.2, np.ceil(
        2 * limit["largest_null_change"] * 100) / 100))
    preset = yaml.safe_load((out / "calibration.yaml").read_text())
    assert preset["guards"]["spectral"]["module_change_limit"] == limit["limit"]
    assert set(stats["top_abs_z"]) == set(stats["runs"])


def test_zoo_row_counts_the_primary_metric_apart_from_guards_and_the_evidence_floor():
    from invarlock.calibration.zoo_run import zoo_row

    def cert(primary_ok: bool, spectral_ok: bool) -> dict:
        return {"verdict": {"status": "PASS" if primary_ok and spectral_ok else "FAIL"},
                "primary_metric": {"ratio": 1.01, "ratio_ci": [1.0, 1.02]},
                "guards": {"spectral": {"flag": "spectral_stable", "passed": spectral_ok}},
                "validation": {"primary_metric_acceptable": primary_ok,
                               "evidence_meets_profile": False,
                               "spectral_stable": spectral_ok}}

    small_windows = zoo_row("noise", "benign", 1, cert(True, True))
    assert small_windows["primary_ok"] is True and small_windows["evidence_ok"] is False
    assert small_windows["failing"] == ["evidence_meets_profile"]
    caught_by_spectral = zoo_row("scale3", "harmful", 0, cert(True, False))
    assert caught_by_spectral["primary_ok"] is True and caught_by_spectral["spectral"] is False
    caught_by_primary = zoo_row("rtn4", "harmful", 0, cert(False, True))
    assert caught_by_primary["primary_ok"] is False
