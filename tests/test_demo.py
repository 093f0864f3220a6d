"""The bundled demo: files match their manifest, load offline, and behave like a trained model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from invarlock import demo
from invarlock.config import load_yaml, validate
from invarlock.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(demo.manifest_path().read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def check_script():
    """scripts/check_demo_model.py as a module (its windowing and fake-quant helpers)."""
    spec = importlib.util.spec_from_file_location(
        "check_demo_model", REPO_ROOT / "scripts" / "check_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loaded(check_script):
    pytest.importorskip("transformers")
    return check_script.load_demo(demo.model_dir())


@pytest.fixture(scope="module")
def windows(check_script, loaded):
    tokenizer, _ = loaded
    return check_script.corpus_windows(tokenizer, demo.read_documents(), SEQ_LEN)


def test_bundled_files_match_manifest(manifest):
    base = demo.model_dir().parent
    listed = set(manifest["files"])
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json",
            "model/tokenizer_config.json", "corpus.txt.gz"} <= listed
    on_disk = {f"model/{p.name}" for p in demo.model_dir().iterdir() if p.is_file()}
    assert on_disk | {"corpus.txt.gz"} == listed, "unlisted or missing model files"
    for rel, entry in manifest["files"].items():
        data = (base / rel).read_bytes()
        assert len(data) == entry["bytes"], rel
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], rel
    assert manifest["files"]["model/model.safetensors"]["bytes"] <= 5_500_000


def test_manifest_records_a_clean_deterministic_split(manifest):
    held = {w["name"] for w in manifest["held_out_works"]}
    train = {w["name"] for w in manifest["train_works"]}
    assert held and train and not held & train
    assert manifest["determinism"]["identical"] is True
    assert manifest["determinism"]["run1_state_sha256"] == \
        manifest["determinism"]["run2_state_sha256"]
    final = manifest["final"]
    assert final["held_out_ppl"] < 0.1 * manifest["hyperparameters"]["vocab_size"]


def test_read_documents_gives_one_document_per_held_out_work(manifest):
    docs = demo.read_documents()
    assert len(docs) == len(manifest["held_out_works"]) == manifest["corpus"]["documents"]
    assert all(doc.strip() and demo.SEPARATOR_LINE not in doc for doc in docs)
    assert sum(len(doc) for doc in docs) == manifest["corpus"]["characters"]


def test_split_documents_splits_only_at_form_feed_lines():
    assert demo.split_documents("a\nb\n\f\nc\n") == ["a\nb", "c"]
    assert demo.split_documents("a\fb\n") == ["a\fb"]
    assert demo.split_documents("a\n\f\n\n\f\nb") == ["a", "", "b"]


def test_read_documents_reports_a_missing_corpus(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "corpus_path", lambda: tmp_path / "absent.txt.gz")
    with pytest.raises(InputError, match="demo corpus missing"):
        demo.read_documents()


def test_paths_and_preset():
    assert (demo.model_dir() / "config.json").is_file()
    assert demo.corpus_path().is_file()
    preset = load_yaml(demo.preset_path())
    assert preset == {"dataset": {"seq_len": 256}}  # the model's context: the ci floor
    validate(preset, "demo preset")


def test_demo_module_does_not_import_torch():
    code = ("import sys, invarlock.demo as d; d.read_documents(); "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_model_and_tokenizer_load_offline(loaded, manifest):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    tokenizer, model = loaded
    assert isinstance(model, GPT2LMHeadModel)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.config.n_positions == 256
    assert len(tokenizer) == model.config.vocab_size == manifest["hyperparameters"]["vocab_size"]
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("To be, or not to be", add_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token_id not in ids, "causal windows must not gain special tokens"
    assert tokenizer.decode(ids) == "To be, or not to be"


def test_corpus_yields_enough_unique_windows(windows, manifest):
    assert windows.shape[0] >= 1000
    assert windows.shape[0] == manifest["corpus"][f"unique_windows_{SEQ_LEN}"]
    assert len({w.numpy().tobytes() for w in windows}) == windows.shape[0]


def test_model_is_trained_int8_passes_and_2bit_fails(check_script, loaded, windows):
    import copy
    import math

    _, model = loaded
    sample = windows[:: windows.shape[0] // 16][:16]
    tokens = sample.shape[0] * (SEQ_LEN - 1)
    base = check_script.window_nll(model, sample)
    assert math.exp(base.sum().item() / tokens) < 0.1 * model.config.vocab_size
    ratios = {}
    for bits in (8, 2):
        edited = copy.deepcopy(model)
        assert check_script.fake_quant_rtn(edited, bits) == 4 * model.config.n_layer
        nll = check_script.window_nll(edited, sample)
        ratios[bits] = math.exp((nll.sum() - base.sum()).item() / tokens)
    assert 0.99 < ratios[8] <= 1.02
    assert ratios[2] > 2.0
