"""Targeted damage is caught by the guard built for it (tiny trained GPT-2; the demo model).

Each subject is the baseline with one kind of damage, certified end to end through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import guardkit as kit

TIERS = ("invariants_pass", "spectral_stable", "rmt_stable", "variance_ok")


@pytest.fixture(scope="module")
def trained_gpt2(tmp_path_factory, tiny_gpt2_dir, sonnets_path) -> Path:
    with kit.one_thread():
        return kit.train_tiny(tiny_gpt2_dir, tmp_path_factory.mktemp("trained") / "gpt2",
                              sonnets_path)


@pytest.fixture(scope="module")
def fast_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "fast.yaml"
    path.write_text(kit.FAST)
    return path


def run(baseline: Path, subject: Path, preset: Path, data: Path, out: Path, *extra: str):
    return kit.certify("--baseline", str(baseline), "--subject", str(subject), "--dataset",
                       str(data), "--profile", "dev", "--preset", str(preset), "--out",
                       str(out), *extra)


def test_identical_subject_all_guards_clean_and_pass(trained_gpt2, fast_preset, sonnets_path,
                                                     tmp_path):
    code, summary, cert = run(trained_gpt2, trained_gpt2, fast_preset, sonnets_path, tmp_path)
    assert code == 0 and summary["verdict"] == "PASS"
    for flag in TIERS:
        assert cert["validation"][flag] is True
    for name, section in cert["guards"].items():
        assert section["passed"] and not section["findings"], name
    assert cert["guards"]["spectral"]["summary"]["families"]["attn"]["max_abs_change"] == 0.0
    assert {"invariants_pass", "spectral_stable", "rmt_stable"} <= set(cert["gating"])
    assert "variance_ok" not in cert["gating"]  # balanced: VE monitors


def test_attention_matrix_tripled_is_a_spectral_violation(trained_gpt2, fast_preset,
                                                          sonnets_path, tmp_path):
    target = "transformer.h.1.attn.c_attn"
    subject = kit.damaged_copy(trained_gpt2, tmp_path / "s", kit.scale_matrix(target, 3.0))
    code, _, cert = run(trained_gpt2, subject, fast_preset, sonnets_path, tmp_path / "o")
    spectral = cert["guards"]["spectral"]
    violations = [f for f in spectral["findings"] if f["kind"] == "violation"]
    assert [f["module"] for f in violations] == [f"{target}.weight"]
    assert violations[0]["relative_change"] == pytest.approx(2.0, rel=1e-4)
    assert cert["validation"]["spectral_stable"] is False and code == 1
    assert any(r.startswith("spectral_stable:") for r in cert["verdict"]["reasons"])


def test_outlier_rows_in_one_ffn_weight_make_rmt_unstable(trained_gpt2, fast_preset,
                                                          sonnets_path, tmp_path):
    target = "transformer.h.0.mlp.c_fc"
    subject = kit.damaged_copy(trained_gpt2, tmp_path / "s", kit.outlier_rows(target))
    code, _, cert = run(trained_gpt2, subject, fast_preset, sonnets_path, tmp_path / "o")
    rmt = cert["guards"]["rmt"]
    assert rmt["passed"] is False and cert["validation"]["rmt_stable"] is False
    assert target in [f["module"] for f in rmt["findings"]]
    assert rmt["summary"]["families"]["ffn"]["stable"] is False
    assert code == 1


def test_uniform_rescale_of_block_outputs_is_reported_by_the_ve_gate(
        trained_gpt2, fast_preset, sonnets_path, tmp_path):
    # The tiny model's loss is nearly flat in the scale of its block outputs, so the test lets
    # the proposal correct fully (max_scale_step 0.5) instead of the tier's cautious step, and
    # gives the gate 64 windows.
    step = tmp_path / "ve.yaml"
    step.write_text("dataset: {preview_n: 64, final_n: 64}\n"
                    "guards: {calibration_windows: 64, variance: {max_scale_step: 0.5}}\n")
    subject = kit.damaged_copy(trained_gpt2, tmp_path / "s", kit.rescale_block_outputs(0.6))
    code, summary, cert = run(trained_gpt2, subject, fast_preset, sonnets_path, tmp_path / "o",
                              "--preset", str(step))
    ve = cert["guards"]["variance"]
    assert summary["ratio"] < 1.02  # the primary metric barely notices
    assert ve["passed"] is False and "would help" in ve["reason"]
    assert ve["summary"]["proposed"] == 4 and ve["measurements"]["gate"] is not None
    assert cert["validation"]["variance_ok"] is False
    assert "variance_ok" not in cert["gating"]  # monitor in balanced: recorded, not gating
    assert code == (0 if summary["verdict"] == "PASS" else 1)


def test_nan_weight_fails_invariants_with_the_module_named(trained_gpt2, fast_preset,
                                                           sonnets_path, tmp_path):
    subject = kit.damaged_copy(trained_gpt2, tmp_path / "s",
                               kit.nan_in("transformer.h.0.mlp.c_fc"))
    code, summary, cert = run(trained_gpt2, subject, fast_preset, sonnets_path, tmp_path / "o")
    assert code == 1 and summary["verdict"] == "FAIL"
    inv = cert["guards"]["invariants"]
    assert inv["passed"] is False and "transformer.h.0.mlp.c_fc" in inv["reason"]
    assert any("invariants_pass" in r and "transformer.h.0.mlp.c_fc" in r
               for r in summary["reasons"])
    assert inv["findings"][0]["module"] == "transformer.h.0.mlp.c_fc"
    for name in ("spectral", "rmt", "variance"):  # the chain stopped: fatal
        assert cert["guards"][name]["measurements"]["evaluated"] is False


def test_write_ve_subject_writes_a_corrected_copy(trained_gpt2, fast_preset, sonnets_path,
                                                  tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    subject = kit.damaged_copy(trained_gpt2, tmp_path / "s", kit.rescale_block_outputs(0.6))
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(subject)
              .state_dict().items()}
    out = tmp_path / "ve"
    _, _, cert = run(trained_gpt2, subject, fast_preset, sonnets_path, tmp_path / "o",
                     "--write-ve-subject", str(out))
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
