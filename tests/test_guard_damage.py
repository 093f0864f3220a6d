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

FLAGS = ("invariants_pass", "spectral_stable", "rows_stable", "rmt_stable", "variance_ok")


@dataclass(frozen=True)
class Bench:
    """A baseline with its data, a small preset and damage sizes that suit it."""

    baseline: Path
    dataset: str
    preset: Path
    outlier_module: str
    outlier_size: float
    embedding: str = "transformer.wte.weight"  # tied with the head
    final_norm: str = "transformer.ln_f.weight"


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


@pytest.fixture(scope="module")
def identical(bench, tmp_path_factory) -> tuple[int, dict, dict]:
    """The baseline certified against itself (its windows are every run's windows)."""
    return run(bench, bench.baseline, tmp_path_factory.mktemp("identical"))


def test_identical_subject_all_guards_clean_and_pass(bench, identical):
    code, summary, cert = identical
    assert code == 0 and summary["verdict"] == "PASS"
    for flag in FLAGS:
        assert cert["validation"][flag] is True
    for name, section in cert["guards"].items():
        assert section["passed"] and not section["findings"], name
    assert cert["guards"]["spectral"]["summary"]["families"]["attn"]["max_abs_change"] == 0.0
    assert cert["guards"]["rmt"]["summary"]["families"]["ffn"]["excess"] == 0
    assert {"invariants_pass", "spectral_stable", "rows_stable", "rmt_stable"} <= set(
        cert["gating"])
    coverage = cert["dataset"]["vocabulary"]
    assert 0 < coverage["share"] < 1 and coverage["vocab_size"] == cert["tokenizer"]["vocab_size"]
    seen = kit.window_tokens(cert, kit.window_stream(bench.baseline, bench.dataset))
    assert coverage["tokens_seen"] == len(seen)
    assert cert["guards"]["rows"]["summary"]["vocabulary_coverage"] == coverage["share"]
    assert "variance_ok" not in cert["gating"]  # balanced: VE monitors


def test_attention_matrix_tripled_is_a_spectral_violation(bench, tmp_path):
    target = "transformer.h.1.attn.c_attn"
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", kit.scale_matrix(target, 3.0))
    code, _, cert = run(bench, subject, tmp_path / "o")
    spectral = cert["guards"]["spectral"]
    violations = [f for f in spectral["findings"] if f["kind"] == "violation"]
    # c_attn's value channels are balanced against c_proj, so the tripled value part shows
    # in both halves of that pair; q and k, tripled together, stay in c_attn
    by_module = {f["module"]: f for f in violations}
    assert f"{target}.weight" in by_module
    assert set(by_module) <= {f"{target}.weight", "transformer.h.1.attn.c_proj.weight"}
    assert by_module[f"{target}.weight"]["relative_change"] > 0.5
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
    fails on spectral, which sees the output projections' σ move by 40%."""
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", kit.rescale_block_outputs(0.6))
    code, summary, cert = run(bench, subject, tmp_path / "o")
    ve = cert["guards"]["variance"]
    tier = cert["policy"]["values"]["guards"]["variance"]
    assert "guards.variance.gating.min_effect_lognll" not in cert["policy"]["overrides"]
    assert ve["summary"]["min_effect"] == tier["gating"]["min_effect_lognll"] == 0.00095
    assert ve["passed"] is False and "would help" in ve["reason"]
    assert ve["summary"]["ci"][1] <= -0.00095 and ve["summary"]["delta"] <= -0.00095
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
    for name in ("spectral", "rows", "rmt", "variance"):  # the chain stopped: fatal
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


def _rows_failure(cert: dict, tensor: str) -> dict:
    rows = cert["guards"]["rows"]
    assert rows["passed"] is False and cert["validation"]["rows_stable"] is False
    assert "rows_stable" in cert["gating"]
    return next(f for f in rows["findings"] if f["module"] == tensor)


@pytest.mark.parametrize("damage", ["permuted", "zeroed", "spiked"])
def test_unseen_embedding_rows_of_a_tied_model_fail_the_rows_guard(bench, identical,
                                                                   tmp_path, damage):
    """Trained rows of tokens the windows never contain: σ, the activations and the
    perplexity on the windows barely move, the rows guard fails and counts them as unseen."""
    stream = kit.window_stream(bench.baseline, bench.dataset)
    unseen = kit.trained_unseen_tokens(identical[2], stream, 6)
    assert len(unseen) == 6 and not set(unseen) & kit.window_tokens(identical[2], stream)
    make = {"permuted": kit.permute_rows, "zeroed": kit.zero_rows,
            "spiked": kit.spike_rows}[damage]
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", make(bench.embedding, unseen))
    code, summary, cert = run(bench, subject, tmp_path / "o")
    finding = _rows_failure(cert, bench.embedding)
    assert code == 1 and summary["verdict"] == "FAIL"
    assert cert["guards"]["rows"]["summary"]["unseen_rows_beyond"] == len(unseen)
    assert "6 of tokens the windows never contain" in finding["message"]
    assert {r["row"] for r in finding["top"][:6]} == set(unseen)
    if damage == "permuted":  # a row permutation keeps σ: spectral cannot see it
        spectral = {m["name"]: m for m in cert["guards"]["spectral"]["measurements"]["modules"]}
        embedding = spectral[bench.embedding]
        assert embedding["sigma_subject"] == pytest.approx(embedding["sigma_baseline"],
                                                           rel=1e-6)
        assert summary["ratio"] < 1.01


def test_a_changed_final_norm_of_a_tied_model_fails_the_rows_guard(bench, tmp_path):
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s",
                               kit.scale_channels(bench.final_norm, [1, 5, 9], 2.0))
    code, _, cert = run(bench, subject, tmp_path / "o")
    finding = _rows_failure(cert, bench.final_norm)
    assert finding["message"].startswith("3 of ") and code == 1


def test_a_permutation_of_mlp_rows_keeps_sigma_and_fails_on_the_edit_along_the_data(
        bench, tmp_path):
    module = "transformer.h.1.mlp.c_fc"
    subject = kit.damaged_copy(bench.baseline, tmp_path / "s", kit.permute_output_rows(module))
    code, _, cert = run(bench, subject, tmp_path / "o")
    spectral = cert["guards"]["spectral"]
    finding = next(f for f in spectral["findings"] if f["module"] == f"{module}.weight")
    assert finding["kind"] == "violation" and "along the data" in finding["message"]
    assert abs(finding["relative_change"]) < 1e-5  # σ kept
    limits = cert["policy"]["values"]["guards"]["spectral"]
    assert finding["edit_along_data"] > limits["edit_along_data_limit"]
    assert cert["validation"]["spectral_stable"] is False and code == 1


@pytest.mark.parametrize("plan", ["{}", "{bitwidth: 4, group_size: 128}"],
                         ids=["int8", "4bit-g128"])
def test_benign_quantization_passes_the_whole_model_checks(bench, tmp_path, plan):
    preset = tmp_path / "edit.yaml"
    preset.write_text(f"edit: {{name: quant_rtn, plan: {plan}}}\n")
    code, summary, cert = kit.certify(
        "--baseline", str(bench.baseline), "--dataset", bench.dataset, "--profile", "dev",
        "--preset", str(bench.preset), "--preset", str(preset), "--out", str(tmp_path / "o"))
    for flag in ("invariants_pass", "spectral_stable", "rows_stable"):
        assert cert["validation"][flag] is True, (flag, cert["guards"])
    assert code == 0 and summary["verdict"] == "PASS", summary["reasons"]


@pytest.mark.parametrize("tensor", ["lm_head.weight", "model.embed_tokens.weight"])
def test_scrambled_unseen_rows_of_an_untied_model_fail_the_rows_guard(tiny_llama_dir,
                                                                      sonnets_path, tmp_path,
                                                                      tensor):
    """Head and embedding are separate tensors: each is compared row by row."""
    preset = tmp_path / "fast.yaml"
    preset.write_text(kit.FAST)
    unseen = kit.unseen_tokens(tiny_llama_dir, [sonnets_path.read_text()])[:5]

    def scramble(model):
        rows = kit.parameter(model, tensor)
        rows[unseen] = rows[unseen].flip(1).clone()

    subject = kit.damaged_copy(tiny_llama_dir, tmp_path / "s", scramble)
    code, _, cert = kit.certify("--baseline", str(tiny_llama_dir), "--subject", str(subject),
                                "--dataset", str(sonnets_path), "--profile", "dev",
                                "--preset", str(preset), "--out", str(tmp_path / "o"))
    finding = _rows_failure(cert, tensor)
    assert "5 of tokens the windows never contain" in finding["message"] and code == 1
    assert [f["module"] for f in cert["guards"]["rows"]["findings"]] == [tensor]
