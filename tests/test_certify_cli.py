"""Integration tests of `invarlock certify` on tiny models built from configs (no downloads).

Each test runs the real CLI in-process (click's runner) and checks the exit code, the `--json`
object, and the certificate it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from invarlock.certificate import document
from invarlock.cli import main

FAST = "dataset: {seq_len: 64, preview_n: 12, final_n: 12}\neval: {bootstrap: {replicates: 200}}\n"


@pytest.fixture
def fast_preset(tmp_path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(FAST)
    return path


def certify(*args: str, cache: Path | None = None) -> tuple[int, dict, str]:
    """Run certify with --json; return (exit code, the JSON object, stderr)."""
    cache_args = ["--cache-dir", str(cache)] if cache else ["--no-cache"]
    result = CliRunner().invoke(main, ["certify", *args, *cache_args, "--json"],
                                catch_exceptions=False)
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout must hold exactly one JSON object: {result.stdout!r}"
    return result.exit_code, json.loads(lines[0]), result.stderr


def _scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    """A subject whose output embedding is scaled: a badly damaged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with __import__("torch").no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_int8_edit_of_causal_lm_passes_and_certificate_is_complete(
        request, model_fixture, fast_preset, sonnets_path, tmp_path):
    model = request.getfixturevalue(model_fixture)
    code, summary, _ = certify("--baseline", str(model), "--edit", "quant_rtn",
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(fast_preset), "--out", str(tmp_path / "o"))
    assert code == 0 and summary["verdict"] == "PASS"
    lo, hi = summary["ratio_ci"]
    assert lo <= summary["ratio"] <= hi <= summary["limit"] == 1.10
    cert = document.load_certificate(summary["certificate"])
    assert document.schema_errors(cert) == []
    assert cert["digest"] == document.content_digest(cert)
    assert cert["pairing"] == {"match": 1.0, "overlap": 0.0, "preview_n": 12, "final_n": 12,
                               "final_evaluated": True}
    assert cert["edit"]["name"] == "quant_rtn" and cert["edit"]["modules_changed"]
    assert cert["subject"]["digest_basis"] == "tensors"
    assert cert["subject"]["weights_digest"] != cert["baseline"]["weights_digest"]
    assert len(cert["windows"]["final"]["subject"]) == 12
    assert (tmp_path / "o" / "evaluation.cert.md").read_text().startswith("# ✅")


def test_identical_subject_passes_with_unit_ratio(tiny_gpt2_dir, fast_preset, sonnets_path,
                                                  tmp_path):
    code, summary, _ = certify("--baseline", str(tiny_gpt2_dir), "--subject", str(tiny_gpt2_dir),
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(fast_preset), "--out", str(tmp_path))
    assert code == 0
    assert summary["ratio"] == 1.0 and summary["ratio_ci"] == [1.0, 1.0]


def test_damaged_subject_fails_with_exit_1_and_final_set_skipped(
        tiny_gpt2_dir, fast_preset, sonnets_path, tmp_path):
    subject = _scaled_copy(tiny_gpt2_dir, tmp_path / "damaged", 40.0)
    code, summary, _ = certify("--baseline", str(tiny_gpt2_dir), "--subject", str(subject),
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(fast_preset), "--out", str(tmp_path / "o"))
    assert code == 1 and summary["verdict"] == "FAIL" and summary["catastrophic"]
    cert = document.load_certificate(summary["certificate"])
    assert cert["validation"]["not_catastrophic"] is False
    assert cert["windows"]["final"]["subject"] == []  # final set never evaluated
    assert cert["pairing"]["final_evaluated"] is False


def test_second_subject_reuses_cached_baseline(tiny_gpt2_dir, fast_preset, sonnets_path,
                                               tmp_path):
    args = ["--baseline", str(tiny_gpt2_dir), "--dataset", str(sonnets_path), "--profile",
            "dev", "--preset", str(fast_preset)]
    cache = tmp_path / "cache"
    _, first, _ = certify(*args, "--edit", "quant_rtn", "--out", str(tmp_path / "a"), cache=cache)
    _, second, _ = certify(*args, "--subject", str(tiny_gpt2_dir), "--out", str(tmp_path / "b"),
                           cache=cache)
    one = document.load_certificate(first["certificate"])
    two = document.load_certificate(second["certificate"])
    assert one["baseline"]["results_from_cache"] is False
    assert two["baseline"]["results_from_cache"] is True
    assert "baseline_eval_s" not in two["timings"]  # the baseline was not evaluated again
    assert one["windows"]["final"]["baseline"] == two["windows"]["final"]["baseline"]


@pytest.mark.parametrize("subject", ["edit", "copy", "other config"])
def test_a_tokenizer_is_loaded_once_per_set_of_files(subject, tiny_gpt2_dir, fast_preset,
                                                      sonnets_path, tmp_path, monkeypatch):
    """The baseline's tokenizer, loaded to plan the windows, serves its model load and any
    subject saved with the same files; a subject whose files differ is loaded once."""
    import shutil

    import transformers

    from invarlock.models import loading

    monkeypatch.setattr(loading, "_TOKENIZERS", {})  # nothing from earlier tests
    loads: list[str] = []
    original = transformers.AutoTokenizer.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        loads.append(Path(path).name)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counted))
    if subject == "edit":
        chosen = ["--edit", "quant_rtn"]
    else:
        copy = shutil.copytree(tiny_gpt2_dir, tmp_path / "subject")
        if subject == "other config":
            config = json.loads((copy / "config.json").read_text())
            config["transformers_version"] = "4.0.0"  # re-saved by another version
            (copy / "config.json").write_text(json.dumps(config))
        chosen = ["--subject", str(copy)]
    code, summary, _ = certify("--baseline", str(tiny_gpt2_dir), *chosen,
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(fast_preset), "--out", str(tmp_path / "o"))
    assert code == 0 and summary["verdict"] == "PASS"
    expected = [tiny_gpt2_dir.name] + (["subject"] if subject == "other config" else [])
    assert loads == expected
    tokenizers = document.load_certificate(summary["certificate"])["guards"]["invariants"][
        "measurements"]["pre"]["tokenizer"]
    assert tokenizers["subject"] == tokenizers["baseline"] == cert_hash(tiny_gpt2_dir)


def cert_hash(model: Path) -> str:
    """The tokenizer's hash, from a fresh load (not the one the run used)."""
    from transformers import AutoTokenizer

    from invarlock.models.tokenizer import tokenizer_hash

    return tokenizer_hash(AutoTokenizer.from_pretrained(model))


def test_masked_lm_certifies_on_masked_positions(tiny_bert_dir, fast_preset, sonnets_path,
                                                 tmp_path):
    code, summary, _ = certify("--baseline", str(tiny_bert_dir), "--edit", "quant_rtn",
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(fast_preset), "--out", str(tmp_path))
    cert = document.load_certificate(summary["certificate"])
    assert code == 0 and cert["primary_metric"]["kind"] == "ppl_mlm"
    # ~15% of 62 content positions per window are scored, not every token.
    assert all(5 <= n <= 15 for n in cert["windows"]["final"]["tokens"])


def test_classifier_gates_on_accuracy_difference(tiny_classifier_dir, labelled_jsonl,
                                                 fast_preset, tmp_path):
    preset = tmp_path / "cls.yaml"
    preset.write_text("dataset: {seq_len: 64, preview_n: 40, final_n: 40}\n"
                      "eval: {bootstrap: {replicates: 200}}\n")
    code, summary, _ = certify("--baseline", str(tiny_classifier_dir), "--subject",
                               str(tiny_classifier_dir), "--dataset", str(labelled_jsonl),
                               "--profile", "dev", "--preset", str(preset),
                               "--out", str(tmp_path))
    assert code == 0
    assert summary["kind"] == "accuracy" and summary["basis"] == "delta_ci_lower"
    assert summary["delta_ci"] == [0.0, 0.0] and summary["limit"] == -1.0


def test_different_tokenizers_exit_3_and_say_what_differs(tmp_path, bpe_tokenizer_dir,
                                                          fast_preset, sonnets_path):
    from tests.tinymodels import build_gpt2, train_bpe_tokenizer

    base = build_gpt2(tmp_path / "base", bpe_tokenizer_dir)
    other_tok = train_bpe_tokenizer(tmp_path / "tok600", vocab_size=600)
    subject = build_gpt2(tmp_path / "subject", other_tok)
    code, summary, stderr = certify("--baseline", str(base), "--subject", str(subject),
                                    "--dataset", str(sonnets_path), "--profile", "dev",
                                    "--preset", str(fast_preset), "--out", str(tmp_path / "o"))
    assert code == 3 and summary["verdict"] == "ERROR"
    assert "tokenizers differ" in summary["error"] and "vocab" in summary["error"]
    assert "Traceback" not in stderr
    assert not (tmp_path / "o" / "evaluation.cert.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--baseline", "no/such/model", "--edit", "quant_rtn", "--dataset", "demo"],
     "no/such/model"),
    (["--baseline", "BASE", "--subject", "x", "--edit", "quant_rtn"], "not both"),
    (["--baseline", "BASE"], "nothing to compare"),
    (["--baseline", "BASE", "--edit", "quant_rtn"], "--dataset is required"),
    (["--baseline", "BASE", "--edit", "quant_rtn", "--dataset", "missing.txt"], "missing.txt"),
    (["--edit-config", "EDIT4"], "bitwidth"),
    (["--preset", "TYPO"], "did you mean 'seq_len'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tiny_gpt2_dir, tmp_path):
    edit = tmp_path / "edit.yaml"
    edit.write_text("edit: {name: quant_rtn, plan: {bitwidth: 9}}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("dataset: {seqlen: 64}\n")
    args = [{"BASE": str(tiny_gpt2_dir), "EDIT4": str(edit), "TYPO": str(typo)}.get(a, a)
            for a in args]
    code, summary, stderr = certify(*args, "--out", str(tmp_path / "o"))
    assert code == 2, summary
    assert message in summary["error"]
    error_lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert len(error_lines) == 1 and "Traceback" not in stderr


def test_save_subject_only_on_pass(tiny_gpt2_dir, fast_preset, sonnets_path, tmp_path):
    saved = tmp_path / "int8"
    code, summary, _ = certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(fast_preset), "--out", str(tmp_path / "o"),
                               "--save-subject", str(saved))
    assert code == 0 and (saved / "model.safetensors").is_file()
    cert = document.load_certificate(summary["certificate"])
    assert cert["artifacts"]["saved_subject"] == str(saved)

    from invarlock.models.loading import load_tokenizer  # the saved subject is complete
    assert load_tokenizer(saved) is not None


def test_human_output_without_json(tiny_gpt2_dir, fast_preset, sonnets_path, tmp_path):
    result = CliRunner().invoke(main, [
        "certify", "--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn", "--dataset",
        str(sonnets_path), "--profile", "dev", "--preset", str(fast_preset), "--out",
        str(tmp_path), "--no-cache"])
    assert result.exit_code == 0
    assert result.stdout.startswith("PASS: ratio ")
    assert "certificate: " in result.stdout


def test_bundled_demo_int8_passes_and_2bit_fails(tmp_path):
    """`invarlock certify` alone certifies the bundled demo; a 2-bit edit of it clearly fails."""
    preset = tmp_path / "small.yaml"
    preset.write_text("dataset: {preview_n: 48, final_n: 48}\n"
                      "eval: {bootstrap: {replicates: 300}}\n")
    code, summary, _ = certify("--profile", "dev", "--preset", str(preset),
                               "--out", str(tmp_path / "int8"))
    cert = document.load_certificate(summary["certificate"])
    assert code == 0 and summary["verdict"] == "PASS"
    assert cert["baseline"]["source"] == "demo" and cert["dataset"]["spec"] == "demo"
    assert cert["edit"]["plan"]["bitwidth"] == 8
    assert summary["ratio_ci"][1] < 1.01  # INT8 barely moves a trained model

    rtn2 = tmp_path / "rtn2.yaml"
    rtn2.write_text("edit: {name: quant_rtn, plan: {bitwidth: 2}}\n")
    code, summary, _ = certify("--edit-config", str(rtn2), "--profile", "dev", "--preset",
                               str(preset), "--out", str(tmp_path / "rtn2"))
    assert code == 1 and summary["verdict"] == "FAIL" and summary["catastrophic"]
