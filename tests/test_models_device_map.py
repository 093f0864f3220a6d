"""Models spread by a device map (accelerate): split between CPU and disk offload on a tiny
LLaMA, its scores and its certificate equal the unsplit model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from invarlock.cli import main
from invarlock.errors import InputError
from invarlock.evaluate import evaluate_windows
from invarlock.models.device import parse_max_memory, resolve_device_map
from invarlock.models.loading import has_offloaded_weights, load_model, weights_on_host
from invarlock.models.source import resolve_model_source

pytest.importorskip("accelerate")


def _split_limit(model_dir) -> int:
    """CPU bytes that hold the embeddings and the first block; the rest goes to disk
    (accelerate keeps room for the largest offloaded layer next to what it places)."""
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) * 9 // 10


@pytest.fixture(scope="module")
def split(tiny_llama_dir):
    limit = _split_limit(tiny_llama_dir)
    return load_model(resolve_model_source(str(tiny_llama_dir)), device="cpu",
                      device_map="sequential", max_memory={"cpu": limit})


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return load_model(resolve_model_source(str(tiny_llama_dir)), device="cpu")


def test_model_is_split_between_cpu_and_disk(split):
    placed = set(split.device_map.values())
    assert placed == {"cpu", "disk"}
    assert has_offloaded_weights(split.model)


def test_split_model_scores_equal_the_unsplit_model(split, plain):
    from tests.test_evaluate import causal_windows

    windows = causal_windows(n=6, seq_len=32)
    spread = evaluate_windows(split.model, windows, kind="ppl_causal", device="cpu",
                              batch_size=4)
    whole = evaluate_windows(plain.model, windows, kind="ppl_causal", device="cpu",
                             batch_size=4)
    np.testing.assert_allclose(spread.values, whole.values, rtol=1e-6)
    np.testing.assert_array_equal(spread.tokens, whole.tokens)


def test_offloaded_weights_readable_inside_the_block_only(split, plain):
    offloaded = [name for name, p in split.model.named_parameters() if p.device.type == "meta"]
    assert offloaded
    name = offloaded[0]
    with weights_on_host(split.model):
        weights = dict(split.model.named_parameters())
        assert weights[name].device.type == "cpu"
        expected = dict(plain.model.named_parameters())[name]
        assert np.array_equal(weights[name].detach().numpy(), expected.detach().numpy())
    assert dict(split.model.named_parameters())[name].device.type == "meta"


def _int8_subject(model_dir, out):
    """The baseline with the built-in INT8 edit, saved as a checkpoint."""
    from invarlock.edits import get_edit
    from invarlock.models.loading import save_checkpoint, tensor_digest

    loaded = load_model(resolve_model_source(str(model_dir)), device="cpu")
    edit = get_edit("quant_rtn")
    edit.apply(loaded.model, edit.parse_plan({"name": "quant_rtn", "plan": {"bitwidth": 8}}))
    loaded.weights_digest = tensor_digest(loaded.model)
    save_checkpoint(loaded, out)
    return out


def _certify(tmp_path, baseline, subject, sonnets, *extra):
    preset = tmp_path / "fast.yaml"
    preset.write_text("dataset: {seq_len: 64, preview_n: 12, final_n: 12}\n"
                      "eval: {bootstrap: {replicates: 200}}\n")
    out = tmp_path / ("split" if extra else "plain")
    result = CliRunner().invoke(main, [
        "certify", "--baseline", str(baseline), "--subject", str(subject), "--dataset",
        str(sonnets), "--profile", "dev", "--preset", str(preset), "--out", str(out),
        "--no-cache", "--json", "--device", "cpu", *extra], catch_exceptions=False)
    summary = json.loads(result.stdout)
    return result.exit_code, json.loads((out / "evaluation.cert.json").read_text()), summary


def test_certify_with_device_map_equals_the_plain_run(tiny_llama_dir, sonnets_path, tmp_path):
    subject = _int8_subject(tiny_llama_dir, tmp_path / "int8")
    limit = _split_limit(tiny_llama_dir)
    code, whole, _ = _certify(tmp_path, tiny_llama_dir, subject, sonnets_path)
    code_split, spread, _ = _certify(tmp_path, tiny_llama_dir, subject, sonnets_path,
                                     "--device-map", "sequential", "--max-memory",
                                     f"cpu={limit}")
    assert code_split == code
    for name in ("preview", "final"):
        for arm in ("baseline", "subject"):
            np.testing.assert_allclose(spread["windows"][name][arm],
                                       whole["windows"][name][arm], rtol=1e-6)
    # the same verdict for the same reasons; the distribution evidence's explanation quotes
    # a KLD near 1e-8, where float32 rounding of the spread forward shows in the 3rd digit
    assert {k: v for k, v in spread["verdict"].items() if k != "explanations"} == {
        k: v for k, v in whole["verdict"].items() if k != "explanations"}
    close = {"distribution_acceptable"}
    assert ({k: v for k, v in spread["verdict"]["explanations"].items() if k not in close}
            == {k: v for k, v in whole["verdict"]["explanations"].items() if k not in close})
    assert spread["validation"] == whole["validation"]
    for key in ("kld_mean", "kld_reverse_mean"):
        assert spread["distribution"][key] == pytest.approx(whole["distribution"][key],
                                                            abs=1e-8)
    assert spread["distribution"]["same_top_p"] == pytest.approx(
        whole["distribution"]["same_top_p"], abs=1e-9)
    sigmas = {m["name"]: m["sigma_subject"]
              for m in whole["guards"]["spectral"]["measurements"]["modules"]}
    spread_sigmas = {m["name"]: m["sigma_subject"]
                     for m in spread["guards"]["spectral"]["measurements"]["modules"]}
    assert spread_sigmas.keys() == sigmas.keys() and len(sigmas) > 4
    for key, value in sigmas.items():
        assert spread_sigmas[key] == pytest.approx(value, rel=1e-6)
    invariants = spread["guards"]["invariants"]["measurements"]["post"]
    assert invariants["fingerprint_before"] == invariants["fingerprint_after"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("0=20GiB,cpu=64GiB", {0: 20 * 2**30, "cpu": 64 * 2**30}),
    ("cpu=1500", {"cpu": 1500}),
    ({"1": "2GB", "mps": "512MiB"}, {1: 2 * 10**9, "mps": 512 * 2**20}),
    (None, None),
])
def test_max_memory_parsed_to_bytes(spec, expected):
    assert parse_max_memory(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("cpu:20GiB", "is not DEVICE=SIZE"),
    ("gpu0=20GiB", "'gpu0' is not a GPU index, cpu or mps"),
    ("cpu=lots", "'lots' is not a size such as 20GiB"),
    ("cpu=20XB", "'20XB' is not a size"),
])
def test_bad_max_memory_is_one_clear_line(spec, message):
    with pytest.raises(InputError, match=message):
        parse_max_memory(spec)


def test_device_map_names():
    assert resolve_device_map(None) is None
    assert resolve_device_map("Balanced") == "balanced"
    with pytest.raises(InputError, match="unknown device map 'everywhere'; use auto"):
        resolve_device_map("everywhere")
