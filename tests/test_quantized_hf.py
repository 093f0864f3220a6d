"""Hugging Face quantized checkpoints: certified from disk with their backend's kernels.

CPU methods tested here: torchao (int8 weight-only) and bitsandbytes (8-bit). Each test
quantizes the tiny Llama with transformers, saves it the way transformers saves it, and
certifies the folder. Methods without CPU kernels are tested on a CUDA device when present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from invarlock.certificate import document  # noqa: E402
from tests.test_certify_cli import FAST, certify  # noqa: E402


def _fast(tmp_path: Path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(FAST)
    return path


def _config(method: str):
    import transformers

    if method == "torchao":
        pytest.importorskip("torchao", reason="needs the torchao extra")
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    if method == "bitsandbytes":
        pytest.importorskip("bitsandbytes", reason="needs the bitsandbytes extra")
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if method == "fp8":
        return transformers.FineGrainedFP8Config()
    raise AssertionError(method)


def quantized_copy(src: Path, out: Path, method: str, device: str = "cpu") -> Path:
    """`src` quantized by transformers with `method` and saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=_config(method),
                                                 device_map=device)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module", params=["torchao", "bitsandbytes"])
def quantized_llama(request, tiny_llama_dir, tmp_path_factory):
    method = request.param
    return method, quantized_copy(tiny_llama_dir, tmp_path_factory.mktemp(method), method)


def test_quantized_folder_certifies_with_its_kernels(quantized_llama, tiny_llama_dir,
                                                     sonnets_path, tmp_path):
    method, subject = quantized_llama
    code, summary, _ = certify("--baseline", str(tiny_llama_dir), "--subject",
                                    str(subject), "--dataset", str(sonnets_path), "--profile",
                                    "dev", "--preset", str(_fast(tmp_path)), "--out",
                                    str(tmp_path / "o"))
    assert code == 0, summary
    cert = document.load_certificate(summary["certificate"])
    fmt = cert["subject"]["format"]
    assert fmt["name"] == "hf-quantized" and fmt["method"] == method and fmt["bits"] == 8
    assert fmt["forward"] == "quantized-kernels" and fmt["backend_version"]
    assert fmt["quantized_modules"] == 14  # every block Linear; embeddings and head stay
    assert len(fmt["module_digests"]) == 16
    assert cert["subject"]["parameters"] == cert["baseline"]["parameters"]
    assert cert["guards"]["invariants"]["passed"], cert["guards"]["invariants"]["reason"]
    spectral = cert["guards"]["spectral"]["measurements"]
    changed = [m["name"] for m in spectral["modules"] if m["changed"]]
    assert len(changed) == 14 and not spectral["unmatched"]  # compared on effective weights


def test_effective_view_names_shapes_and_values(quantized_llama, tiny_llama_dir):
    """The view presents the float model's names and shapes; a dequantized weight is close
    to, but not equal to, the float weight it was made from (int8: within one step)."""
    from transformers import AutoModelForCausalLM

    from invarlock.models.effective import EffectiveWeights

    method, subject = quantized_llama
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    model = AutoModelForCausalLM.from_pretrained(subject, device_map="cpu")
    view = EffectiveWeights(model)
    assert set(view) == set(base)
    assert len(view.quantized) == 14
    for name in view.quantized:
        w, b = view[name], base[name]
        assert w.shape == b.shape and w.dtype == torch.float32
        step = b.abs().amax(dim=1, keepdim=True) / 127
        assert not torch.equal(w, b)
        assert bool(((w - b).abs() <= step * 0.51 + 1e-3).all()), name
    if method == "bitsandbytes":
        assert any(n.endswith(".SCB") for n in view.format_tensors)


def test_dequantize_flag_runs_float_weights(tiny_llama_dir, sonnets_path, tmp_path):
    pytest.importorskip("bitsandbytes", reason="needs the bitsandbytes extra")
    subject = quantized_copy(tiny_llama_dir, tmp_path / "bnb", "bitsandbytes")
    code, summary, _ = certify("--baseline", str(tiny_llama_dir), "--subject", str(subject),
                               "--dequantize", "--dataset", str(sonnets_path), "--profile",
                               "dev", "--preset", str(_fast(tmp_path)), "--out",
                               str(tmp_path / "o"))
    assert code == 0, summary
    fmt = document.load_certificate(summary["certificate"])["subject"]["format"]
    assert fmt["forward"] == "dequantized" and fmt["dequantize_requested"] is True
    assert fmt["quantized_modules"] == 0  # replaced by float Linear modules


def _with_quantization(src: Path, out: Path, qc: dict) -> Path:
    """A copy of `src` declaring `qc`, whose weights hold a packed int32 code tensor as
    quantized checkpoints do (a float-only one is refused as float before these checks)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(4, 8, dtype=torch.int32)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("qc", "code", "message"), [
    ({"quant_method": "no-such-method"}, 2, "does not know"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, 3, "--dequantize"),
])
def test_quantization_config_refused_before_loading(qc, code, message, tiny_llama_dir,
                                                    tmp_path):
    if qc["quant_method"] == "fp8" and torch.cuda.is_available():
        pytest.skip("fp8 has kernels on this machine's CUDA device")
    subject = _with_quantization(tiny_llama_dir, tmp_path / "q", qc)
    got, summary, stderr = certify("--baseline", str(tiny_llama_dir), "--subject",
                                   str(subject), "--device", "cpu", "--dataset", "demo",
                                   "--out", str(tmp_path / "o"))
    assert got == code and message in summary["error"], summary
    assert len([ln for ln in stderr.splitlines() if "error:" in ln]) == 1
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("method", "extra"), [("gptq", "gptq"), ("awq", "awq")])
def test_missing_backend_names_the_extra(method, extra, tiny_llama_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("gptqmodel is installed here: the backend is not missing")
    subject = _with_quantization(tiny_llama_dir, tmp_path / "q",
                                 {"quant_method": method, "bits": 4, "group_size": 128})
    code, summary, stderr = certify("--baseline", str(tiny_llama_dir), "--subject",
                                    str(subject), "--dataset", "demo", "--out",
                                    str(tmp_path / "o"))
    assert code == 3, summary
    assert method in summary["error"] and f"invarlock[{extra}]" in summary["error"]
    assert "Traceback" not in stderr


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FP8 kernels need a CUDA device (none here)")
def test_fp8_on_cuda_runs_quantized_kernels(tiny_llama_dir, sonnets_path, tmp_path):
    subject = quantized_copy(tiny_llama_dir, tmp_path / "fp8", "fp8", device="cuda")
    code, summary, _ = certify("--baseline", str(tiny_llama_dir), "--subject", str(subject),
                               "--device", "cuda", "--dataset", str(sonnets_path),
                               "--profile", "dev", "--preset", str(_fast(tmp_path)),
                               "--out", str(tmp_path / "o"))
    assert code in (0, 1), summary
    fmt = document.load_certificate(summary["certificate"])["subject"]["format"]
    assert fmt["method"] == "fp8" and fmt["forward"] == "quantized-kernels"


def test_guards_hold_one_dequantized_module_at_a_time(tiny_llama_dir, sonnets_path, tmp_path,
                                                      monkeypatch):
    """Every guard reads quantized weights through the effective view; when it asks for the
    next module, at most one earlier dequantized module is still alive (the one it is done
    with), however many modules the model has."""
    import weakref

    from invarlock.models import effective

    pytest.importorskip("torchao", reason="needs the torchao extra")
    subject = quantized_copy(tiny_llama_dir, tmp_path / "ao", "torchao")
    made: list[weakref.ref] = []
    most_alive = 0
    original = effective.effective_weight

    def tracking(module):
        nonlocal most_alive
        out = original(module)
        if effective.is_quantized(module):
            most_alive = max(most_alive, sum(r() is not None for r in made))
            made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(effective, "effective_weight", tracking)
    code, summary, _ = certify("--baseline", str(tiny_llama_dir), "--subject", str(subject),
                               "--dataset", str(sonnets_path), "--profile", "dev",
                               "--preset", str(_fast(tmp_path)), "--out", str(tmp_path / "o"))
    assert code == 0, summary
    assert len(made) >= 3 * 14  # invariants, spectral, digests (and variance) all read them
    assert most_alive <= 1
