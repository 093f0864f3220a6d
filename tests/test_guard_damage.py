"""Targeted damage is caught by the guard built for it, on a briefly trained tiny GPT-2 and on
the bundled demo model (skipped where the demo is not installed).

Each subject is the baseline with one kind of damage, saved as a checkpoint and certified
end to end through the CLI under the balanced tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import guardkit as kit

FLAGS = ("invariants_pass", "spectral_stable", "rmt_stable", "variance_ok")


@dataclass(frozen=True)
class Bench:
    """A baseline with its data, a small preset and damage sizes that suit it."""

    baseline: Path
    dataset: str
    preset: Path
    outlier_module: str
    outlier_size: float


@pytest.fixture(scope="module", params=["tiny", "demo"])
def bench(request, tmp_path_factory, tiny_gpt2_dir, sonnets_path) -> Bench:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny":
        preset = root / "fast.yaml"
        preset.write_text(kit.FAST)
        with kit.one_thread():
            model = kit.train_tiny(tiny_gpt2_dir, root / "gpt2", sonnets_path)
        return Bench(model, str(sonnets_path), preset, "transformer.h.0.mlp.c_fc", 25.0)
    demo = kit.demo_dir()
    if demo is None:
        pytest.skip("the bundled demo model is not installed")
    preset = root / "small.yaml"
    preset.write_text("dataset: {preview_n: 32, final_n: 32}\n"
                      "eval: {bootstrap: {replicates: 300}}\n")
    return Bench(demo, "demo", preset, "transformer.h.1.mlp.c_fc", 12.0)


def run(bench: Bench, subject: Path, out: Path, *extra: str):
    return kit.certify("--baseline", str(bench.baseline), "--subject", str(subject),
                       "--dataset", bench.dataset, "--profile", "dev", "--preset",
                       str(bench.preset), "--out", str(out), *extra)


def test_identical_subject_all_guards_clean_and_pass(bench, tmp_path):
    code, summary, cert = run(bench, bench.baseline, tmp_path)
    assert code == 0 and summary["verdict"] == "PASS"
    for flag in FLAGS:
        assert cert["validation"][flag] is True
    for name, section in cert["guards"].items():
        assert section["passed"] and not section["findings"], name
    assert cert["guards"]["spectral"]["summary"]["families"]["attn"]["max_abs_change"] == 0.0
    assert cert["guards"]["rmt"]["summary"]["families"]["ffn"]["excess"] == 0
    assert {"invariants_pass", "spectral_stable", "rmt_stable"} <= set(cert["gating"])
    assert "variance_ok" not in cert["gating"]  # balanced: VE monitors


def test_attention_matrix_tripled_is_a_spectral_violation(bench, tmp_path):
    target = "transformer.h.1.attn.c_attn"
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", kit.scale_matrix(target, 3.0))
    code, _, cert = run(bench, subject, tmp_path / "o")
    spectral = cert["guards"]["spectral"]
    violations = [f for f in spectral["findings"] if f["kind"] == "violation"]
    assert [f["module"] for f in violations] == [f"{target}.weight"]
    assert violations[0]["relative_change"] == pytest.approx(2.0, rel=1e-4)
    assert cert["validation"]["spectral_stable"] is False and code == 1
    assert any(r.startswith("spectral_stable:") for r in cert["verdict"]["reasons"])


def test_outlier_rows_in_one_ffn_weight_make_rmt_unstable(bench, tmp_path):
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s",
                               kit.outlier_rows(bench.outlier_module, size=bench.outlier_size))
    code, _, cert = run(bench, subject, tmp_path / "o")
    rmt = cert["guards"]["rmt"]
    assert rmt["passed"] is False and cert["validation"]["rmt_stable"] is False
    assert rmt["summary"]["families"]["ffn"]["stable"] is False
    assert any(f["family"] == "ffn" for f in rmt["findings"])
    assert "rmt_stable" in cert["gating"] and code == 1


@pytest.mark.parametrize("bench", ["demo"], indirect=True)  # a trained model's loss is
def test_uniform_rescale_of_block_outputs_is_reported_by_the_ve_gate(bench, tmp_path):
    """Every block output ×0.6 on the demo model, judged with the balanced tier's own VE
    settings (its minimum effect and scale step, nothing lowered): equalising would help by
    more than the minimum effect, so VE reports it; it monitors in balanced, and the verdict
    fails on spectral, which sees the output projections' σ move by 40%. (×0.8 predicts a
    gain of 0.005 whose interval still reaches above −0.0049: not reported.)"""
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", kit.rescale_block_outputs(0.6))
    code, summary, cert = run(bench, subject, tmp_path / "o")
    ve = cert["guards"]["variance"]
    tier = cert["policy"]["values"]["guards"]["variance"]
    assert "guards.variance.gating.min_effect_lognll" not in cert["policy"]["overrides"]
    assert ve["summary"]["min_effect"] == tier["gating"]["min_effect_lognll"] == 0.0049
    assert ve["passed"] is False and "would help" in ve["reason"]
    assert ve["summary"]["ci"][1] <= -0.0049 and ve["summary"]["delta"] <= -0.0049
    assert ve["summary"]["proposed"] == len(ve["measurements"]["modules"])
    assert cert["validation"]["variance_ok"] is False
    assert "variance_ok" not in cert["gating"]  # monitor in balanced: recorded, not gating
    assert cert["validation"]["spectral_stable"] is False
    assert code == 1 and summary["verdict"] == "FAIL"
    assert "spectral_stable" in [r.split(":")[0] for r in summary["reasons"]]


def test_nan_weight_fails_invariants_with_the_module_named(bench, tmp_path):
    module = "transformer.h.0.mlp.c_fc"
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", kit.nan_in(module))
    code, summary, cert = run(bench, subject, tmp_path / "o")
    assert code == 1 and summary["verdict"] == "FAIL"
    inv = cert["guards"]["invariants"]
    assert inv["passed"] is False and module in inv["reason"]
    assert any("invariants_pass" in r and module in r for r in summary["reasons"])
    assert inv["findings"][0]["module"] == module
    for name in ("spectral", "rmt", "variance"):  # the chain stopped: fatal
        assert cert["guards"][name]["measurements"]["evaluated"] is False


@pytest.mark.parametrize("bench", ["tiny"], indirect=True)  # one model is enough for a copy
def test_write_ve_subject_writes_a_corrected_copy(bench, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", kit.rescale_block_outputs(0.6))
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(subject)
              .state_dict().items()}
    out = tmp_path / "ve"
    _, _, cert = run(bench, subject, tmp_path / "o", "--write-ve-subject", str(out))
    assert cert["artifacts"]["ve_subject"] == str(out)
    corrected = AutoModelForCausalLM.from_pretrained(out).state_dict()
    unchanged = AutoModelForCausalLM.from_pretrained(subject).state_dict()
    for key, value in before.items():  # the subject on disk is untouched
        assert torch.equal(unchanged[key], value)
    name = "transformer.h.0.mlp.c_proj.weight"
    ratio = (corrected[name] / before[name]).flatten()
    alpha = next(f["alpha"] for f in cert["guards"]["variance"]["findings"]
                 if f["module"] == "transformer.h.0.mlp.c_proj")
    assert alpha == pytest.approx(1.03)  # the tier's max_scale_step
    assert torch.allclose(ratio, torch.full_like(ratio, alpha), rtol=1e-5)
