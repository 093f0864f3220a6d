"""`invarlock doctor`: each preflight problem becomes a finding with its stable code, without
evaluating any model; exit 2 exactly when there is an ERROR."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from invarlock.cli import main
from invarlock.doctor import CODES, diagnose
from invarlock.doctor import checks as doctor_checks
from invarlock.doctor.metadata import read_safetensors_header
from invarlock.errors import InputError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
DEV = "dataset: {seq_len: 64, preview_n: 8, final_n: 8}\nauto: {profile: dev}\n"


def doctor(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["doctor", *args, "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def codes(payload: dict, severity: str | None = None) -> list[str]:
    return [f["code"].removeprefix("INVARLOCK:") for f in payload["findings"]
            if severity is None or f["severity"] == severity]


def message(payload: dict, code: str) -> str:
    return " | ".join(f["message"] for f in payload["findings"]
                      if f["code"] == f"INVARLOCK:{code}")


@pytest.fixture
def dev_preset(tmp_path) -> str:
    path = tmp_path / "dev.yaml"
    path.write_text(DEV)
    return str(path)


def test_a_sound_run_has_no_errors_and_says_what_it_will_use(tiny_gpt2_dir, sonnets_path,
                                                             dev_preset):
    code, payload = doctor("-c", dev_preset, "--baseline", str(tiny_gpt2_dir), "--edit",
                           "quant_rtn", "--dataset", str(sonnets_path))
    assert code == 0, payload
    assert payload["format_version"] == 1
    assert payload["summary"] == {"ok": True, "errors": 0, "warnings": 0,
                                  "notes": len(payload["findings"])}
    assert codes(payload) == ["D050", "D018", "D005", "D033", "D041"]
    assert "45,952 parameters" in message(payload, "D018")
    assert payload["policy"]["profile"] == "dev"
    assert payload["resolution"]["windows"]["preview_n"] == 8
    assert payload["resolution"]["baseline"]["architecture"] == "GPT2LMHeadModel"


def test_text_form_has_severity_and_code_on_each_line(tiny_gpt2_dir, tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("dataset: {seqlen: 64}\n")
    result = CliRunner().invoke(main, ["doctor", "-c", str(bad)])
    assert result.exit_code == 2
    lines = result.stdout.splitlines()
    assert re.match(r"^NOTE: \[INVARLOCK:D050\] ", lines[0])
    assert any(re.match(r"^ERROR: \[INVARLOCK:D002\] .*did you mean 'seq_len'", ln)
               for ln in lines)
    assert lines[-1] == "doctor: 1 error(s), 0 warning(s), 1 note(s)"


@pytest.mark.parametrize(("text", "code", "words"), [
    (None, "D001", "config file not found"),
    ("dataset: [1, 2\n", "D001", "line"),
    ("dataset: {seqlen: 64}\nmodel: {devise: cpu}\n", "D002", "did you mean 'device'"),
    ("auto: {tier: lenient}\n", "D002", "auto.tier must be one of"),
    ("dataset: {seq_len: 64, stride: 32}\n", "D003", "windows would overlap"),
    ("dataset: {preview_n: 8, final_n: 9}\n", "D003", "must be equal"),
    ("model: {id: BASE}\ndataset: {provider: demo}\n", "D004", "nothing to compare"),
    ("model: {id: BASE}\nedit: {name: quant_rtn, plan: {bitwidth: 9}}\n"
     "dataset: {provider: demo}\n", "D002", "bitwidth"),
])
def test_configuration_problems(text, code, words, tmp_path, tiny_gpt2_dir):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text.replace("BASE", str(tiny_gpt2_dir)))
    status, payload = doctor("-c", str(path))
    assert status == 2
    assert code in codes(payload, "ERROR") and words in message(payload, code), payload


def test_models_that_cannot_be_resolved(tiny_gpt2_dir, sonnets_path, dev_preset, tmp_path):
    _, payload = doctor("-c", dev_preset, "--baseline", str(tmp_path / "none"), "--subject",
                        str(tmp_path / "nothing"), "--dataset", str(sonnets_path))
    assert {"D010", "D011"} <= set(codes(payload, "ERROR"))
    odd = shutil.copytree(tiny_gpt2_dir, tmp_path / "odd")
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "architectures": ["OddNet"],
                                                 "model_type": "odd"}))
    _, payload = doctor("-c", dev_preset, "--baseline", str(odd), "--edit", "quant_rtn",
                        "--dataset", str(sonnets_path))
    assert "D012" in codes(payload, "ERROR") and "OddNet" in message(payload, "D012")


def test_weights_pickle_only_and_corrupt_header(tiny_gpt2_dir, sonnets_path, dev_preset,
                                                tmp_path):
    pickled = shutil.copytree(tiny_gpt2_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    _, payload = doctor("-c", dev_preset, "--baseline", str(pickled), "--edit", "quant_rtn",
                        "--dataset", str(sonnets_path))
    assert "D013" in codes(payload, "ERROR") and "--allow-pickle" in message(payload, "D013")
    corrupt = shutil.copytree(tiny_gpt2_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _, payload = doctor("-c", dev_preset, "--baseline", str(corrupt), "--edit", "quant_rtn",
                        "--dataset", str(sonnets_path))
    assert "D014" in codes(payload, "ERROR")


def test_safetensors_header_gives_names_shapes_and_dtypes(tiny_gpt2_dir, tmp_path):
    tensors = read_safetensors_header(tiny_gpt2_dir / "model.safetensors")
    assert tensors["transformer.wte.weight"].shape[1] == 32
    assert {t.dtype for t in tensors.values()} == {"F32"}
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01")
    with pytest.raises(InputError, match="too short"):
        read_safetensors_header(short)


def test_mismatched_pair_is_reported_before_any_evaluation(tiny_gpt2_dir, tiny_llama_dir,
                                                           sonnets_path, dev_preset):
    code, payload = doctor("-c", dev_preset, "--baseline", str(tiny_gpt2_dir), "--subject",
                           str(tiny_llama_dir), "--dataset", str(sonnets_path))
    assert code == 2
    assert {"D015", "D016", "D017"} <= set(codes(payload, "ERROR"))
    assert "only in the baseline" in message(payload, "D016")


def test_tokenizers_that_differ(tmp_path, bpe_tokenizer_dir, sonnets_path, dev_preset):
    from tests.tinymodels import build_gpt2, train_bpe_tokenizer

    base = build_gpt2(tmp_path / "base", bpe_tokenizer_dir)
    subject = build_gpt2(tmp_path / "subject", train_bpe_tokenizer(tmp_path / "t", 600))
    _, payload = doctor("-c", dev_preset, "--baseline", str(base), "--subject", str(subject),
                        "--dataset", str(sonnets_path))
    assert "D021" in codes(payload, "ERROR") and "vocab" in message(payload, "D021")


def test_window_supply_against_the_profile(tiny_gpt2_dir, sonnets_path, tmp_path):
    many = tmp_path / "many.yaml"
    many.write_text("dataset: {seq_len: 64, preview_n: 400, final_n: 400}\n"
                    "auto: {allow_underpowered: true}\n")  # 64 tokens: below the ci floor
    args = ("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn", "--dataset",
            str(sonnets_path), "-c", str(many))
    code, payload = doctor(*args, "--profile", "ci")
    assert code == 2 and "D031" in codes(payload, "ERROR")
    code, payload = doctor(*args, "--profile", "dev")
    assert code == 0 and "D032" in codes(payload, "WARNING")


def test_dataset_and_context_problems(tiny_gpt2_dir, tiny_classifier_dir, sonnets_path,
                                      tmp_path, dev_preset):
    long = tmp_path / "long.yaml"
    long.write_text("dataset: {seq_len: 4096, preview_n: 8, final_n: 8}\nauto: {profile: dev}\n")
    _, payload = doctor("-c", str(long), "--baseline", str(tiny_gpt2_dir), "--edit",
                        "quant_rtn", "--dataset", str(sonnets_path))
    assert "D034" in codes(payload, "ERROR") and "context length" in message(payload, "D034")
    _, payload = doctor("-c", dev_preset, "--baseline", str(tiny_classifier_dir), "--edit",
                        "quant_rtn", "--dataset", str(sonnets_path))
    assert "D030" in codes(payload, "ERROR") and "labelled" in message(payload, "D030")


def test_device_and_memory(tiny_gpt2_dir, sonnets_path, dev_preset, monkeypatch):
    import torch

    args = ("-c", dev_preset, "--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
            "--dataset", str(sonnets_path))
    if not torch.cuda.is_available():
        _, payload = doctor(*args, "--device", "cuda")
        assert "D040" in codes(payload, "ERROR")
    need = int(45_952 * 4 * doctor_checks.MEMORY_MARGIN)
    monkeypatch.setattr(doctor_checks, "free_memory", lambda device: need // 2)
    code, payload = doctor(*args, "--device", "cpu")
    assert code == 2 and "D042" in codes(payload, "ERROR")
    monkeypatch.setattr(doctor_checks, "free_memory", lambda device: int(need * 1.2))
    code, payload = doctor(*args, "--device", "cpu")
    assert code == 0 and "D043" in codes(payload, "WARNING")
    assert payload["resolution"]["device"]["memory_needed"] == need


def test_without_the_hf_extra_the_metadata_checks_still_run(tiny_gpt2_dir, sonnets_path,
                                                            dev_preset, monkeypatch):
    monkeypatch.setattr(doctor_checks, "missing_hf_modules", lambda: ["torch"])
    result = diagnose(configs=[dev_preset], flags={"baseline": str(tiny_gpt2_dir),
                                                   "edit_name": "quant_rtn",
                                                   "dataset_spec": str(sonnets_path)})
    found = [f.code for f in result.findings]
    assert found == ["D050", "D018", "D005", "D060"] and result.exit_code == 2
    assert 'pip install "invarlock[hf]"' in result.findings[-1].line()


def test_network_policy_note(monkeypatch, tmp_path):
    monkeypatch.setenv("INVARLOCK_ALLOW_NETWORK", "1")
    _, payload = doctor("-c", str(tmp_path / "missing.yaml"))
    assert codes(payload)[0] == "D051"


def test_every_code_is_documented_with_its_severity():
    text = DOCS.read_text(encoding="utf-8")
    for code, (severity, _meaning) in CODES.items():
        assert re.search(rf"\|\s*`?{code}`?\s*\|\s*{severity}\s*\|", text), code
