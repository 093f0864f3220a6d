"""Model sources, adapters, weight files and digests: decided from files, without torch."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest

from invarlock import network
from invarlock.enums import AdapterKind
from invarlock.errors import InputError
from invarlock.models.source import (
    ModelSource,
    detect_adapter,
    read_config,
    resolve_model_source,
    weight_files,
    weights_digest,
)

NETWORK_OFF = "network access is off; set INVARLOCK_ALLOW_NETWORK=1"


@pytest.fixture
def no_sockets(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("INVARLOCK_ALLOW_NETWORK", raising=False)
    return cache


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- resolving sources -------------------------------------------------------------------


def test_local_directory_resolves(tiny_gpt2_dir):
    source = resolve_model_source(str(tiny_gpt2_dir))
    assert source == ModelSource(spec=str(tiny_gpt2_dir), kind="local",
                                 path=tiny_gpt2_dir.resolve())


def test_local_directory_needs_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"has no config\.json"):
        resolve_model_source(str(tmp_path))


def test_local_file_is_refused(tiny_gpt2_dir):
    with pytest.raises(InputError, match="is a file; give the checkpoint directory"):
        resolve_model_source(str(tiny_gpt2_dir / "config.json"))


def test_missing_relative_path_is_not_a_hub_id(no_sockets):
    with pytest.raises(InputError, match=r"model directory './nowhere/model' does not exist"):
        resolve_model_source("./nowhere/model")


def test_revision_only_for_hub(tiny_gpt2_dir):
    with pytest.raises(InputError, match="revision applies only to hub models"):
        resolve_model_source(str(tiny_gpt2_dir), revision="main")


@pytest.mark.parametrize("spec", ["someorg/not-cached-model", "hf:someorg/not-cached-model",
                                  "gpt2-not-cached"])
def test_hub_id_offline_is_one_clear_error(spec, no_sockets, empty_hub_cache):
    with pytest.raises(InputError) as info:
        resolve_model_source(spec)
    assert f"model '{spec}' is not a local directory and {NETWORK_OFF}" in str(info.value)


def test_invalid_hub_id(no_sockets, empty_hub_cache):
    with pytest.raises(InputError, match="not a valid Hugging Face Hub model id"):
        resolve_model_source("hf:a/b/c")


def test_cached_hub_model_resolves_offline(tiny_gpt2_dir, no_sockets, empty_hub_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--someorg--tiny"
    _copy(tiny_gpt2_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = resolve_model_source("hf:someorg/tiny")
    assert source.kind == "hub" and source.hub_id == "someorg/tiny"
    assert source.path == repo / "snapshots" / commit
    assert detect_adapter(read_config(source)) is AdapterKind.CAUSAL_LM
    pinned = resolve_model_source("someorg/tiny", revision=commit)
    assert pinned.path == source.path and pinned.revision == commit


def test_network_allowed_downloads_without_pickles(tiny_gpt2_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(tiny_gpt2_dir)

    monkeypatch.setenv("INVARLOCK_ALLOW_NETWORK", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = resolve_model_source("someorg/tiny", revision="v1")
    assert source.path == tiny_gpt2_dir and source.kind == "hub"
    resolve_model_source("hf:someorg/tiny", allow_pickle=True)
    (_, revision, safe), (_, _, widened) = calls
    assert revision == "v1"
    assert "*.safetensors" in safe and "*.bin" not in safe
    assert "*.bin" in widened


def test_download_failure_is_input_error(monkeypatch):
    import huggingface_hub

    def failing(*_args, **_kwargs):
        raise OSError("404 Client Error: Repository Not Found")

    monkeypatch.setenv("INVARLOCK_ALLOW_NETWORK", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(InputError, match=r"cannot download model 'someorg/x'.*Repository Not"):
        resolve_model_source("someorg/x")


def test_demo_source_uses_bundled_model_dir(tiny_gpt2_dir, monkeypatch):
    fake = types.ModuleType("invarlock.demo")
    fake.model_dir = lambda: tiny_gpt2_dir
    monkeypatch.setitem(sys.modules, "invarlock.demo", fake)
    monkeypatch.setattr("invarlock.demo", fake, raising=False)
    source = resolve_model_source("demo")
    assert source.kind == "demo" and source.path == tiny_gpt2_dir


def test_offline_mode_is_forced_unless_allowed(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("INVARLOCK_ALLOW_NETWORK", "1")
    network.enforce_offline()
    assert hub_constants.HF_HUB_OFFLINE is False
    monkeypatch.delenv("INVARLOCK_ALLOW_NETWORK")
    network.enforce_offline()
    assert hub_constants.HF_HUB_OFFLINE is True
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


# --- config and adapters -----------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "expected"), [
    ("tiny_gpt2_dir", AdapterKind.CAUSAL_LM),
    ("tiny_llama_dir", AdapterKind.CAUSAL_LM),
    ("tiny_bert_dir", AdapterKind.MASKED_LM),
    ("tiny_classifier_dir", AdapterKind.SEQ_CLS),
])
def test_adapter_detected_from_config(fixture, expected, request):
    config = read_config(request.getfixturevalue(fixture))
    assert detect_adapter(config) is expected
    assert detect_adapter(config, "auto") is expected


@pytest.mark.parametrize(("alias", "architecture", "expected"), [
    ("hf_gpt2", "GPT2LMHeadModel", AdapterKind.CAUSAL_LM),
    ("hf_llama", "LlamaForCausalLM", AdapterKind.CAUSAL_LM),
    ("hf_mistral", "MistralForCausalLM", AdapterKind.CAUSAL_LM),
    ("hf_qwen2", "Qwen2ForCausalLM", AdapterKind.CAUSAL_LM),
    ("hf_bert", "BertForMaskedLM", AdapterKind.MASKED_LM),
    ("hf_bert_cls", "BertForSequenceClassification", AdapterKind.SEQ_CLS),
    ("hf_causal", "GPT2Model", AdapterKind.CAUSAL_LM),
    ("HF_MLM", "BertModel", AdapterKind.MASKED_LM),
])
def test_adapter_aliases(alias, architecture, expected):
    assert detect_adapter({"architectures": [architecture]}, alias) is expected


def test_adapter_alias_must_fit_architecture():
    with pytest.raises(InputError, match=r"adapter 'hf_llama' does not fit architecture "
                                         r"BertForSequenceClassification \(which is hf_seq_cls\)"):
        detect_adapter({"architectures": ["BertForSequenceClassification"]}, "hf_llama")


def test_unknown_adapter_name():
    with pytest.raises(InputError, match="unknown adapter 'hf_t5'; choose one of: auto, hf_causal"):
        detect_adapter({"architectures": ["GPT2LMHeadModel"]}, "hf_t5")


def test_unknown_architecture_is_input_error():
    config = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}
    with pytest.raises(InputError, match="cannot tell how to score architecture "
                                         "'T5ForConditionalGeneration'"):
        detect_adapter(config)


def test_model_type_fallback_without_architectures():
    assert detect_adapter({"model_type": "llama"}) is AdapterKind.CAUSAL_LM
    assert detect_adapter({"model_type": "bert"}) is AdapterKind.MASKED_LM
    with pytest.raises(InputError, match="cannot tell how to score model_type 'whisper'"):
        detect_adapter({"model_type": "whisper"})


def test_remote_code_config_is_refused(tmp_path):
    config = {"architectures": ["MagicForCausalLM"], "model_type": "magic",
              "auto_map": {"AutoModelForCausalLM": "modeling_magic.MagicForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"needs custom model code.*never runs remote code"):
        read_config(tmp_path)


def test_auto_map_with_builtin_model_type_is_accepted(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "auto_map": {"AutoModelForCausalLM": "modeling.LlamaForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path)["model_type"] == "llama"


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config.json is not valid JSON"):
        read_config(tmp_path)


# --- weight files ------------------------------------------------------------------------


def test_safetensors_found(tiny_gpt2_dir):
    assert weight_files(tiny_gpt2_dir) == [tiny_gpt2_dir / "model.safetensors"]


def test_pickle_only_refused_without_allow(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(InputError, match="refused unless you pass --allow-pickle"):
        weight_files(tmp_path)
    assert weight_files(tmp_path, allow_pickle=True) == [tmp_path / "pytorch_model.bin"]


def test_safetensors_preferred_over_pickle(tiny_gpt2_dir, tmp_path):
    model = _copy(tiny_gpt2_dir, tmp_path / "m")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x02")
    assert weight_files(model) == [model / "model.safetensors"]


def test_sharded_safetensors(tmp_path):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors",
                                            "c": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"1")
    with pytest.raises(InputError, match=r"names missing shard.*00002-of-00002"):
        weight_files(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"2")
    assert [p.name for p in weight_files(tmp_path)] == [
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"]


def test_no_weights(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(InputError, match=r"has no weights.*found model\.gguf: give the \.gguf"):
        weight_files(tmp_path)


def test_weights_digest_is_stable_and_content_bound(tiny_gpt2_dir, tmp_path):
    files = weight_files(tiny_gpt2_dir)
    first = weights_digest(files)
    assert first.startswith("sha256:") and len(first) == 7 + 64
    assert weights_digest(files) == first
    copy = _copy(tiny_gpt2_dir, tmp_path / "copy")
    assert weights_digest(weight_files(copy)) == first  # names and bytes, not locations
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert weights_digest(weight_files(copy)) != first


def test_weights_digest_hashes_a_settled_file_once_and_a_changed_one_again(tmp_path,
                                                                          monkeypatch):
    import os
    import time

    opened = []
    real_open = Path.open

    def counting_open(self, mode="r", *args, **kwargs):
        if mode == "rb":
            opened.append(self.name)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    settled = tmp_path / "model.safetensors"
    settled.write_bytes(b"a" * 1000)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(settled, ns=(an_hour_ago, an_hour_ago))
    first = weights_digest([settled])
    assert weights_digest([settled]) == first and len(opened) == 1  # remembered
    settled.write_bytes(b"b" * 1000)  # same size, new modification time
    changed = weights_digest([settled])
    assert changed != first and len(opened) == 2
    # written just now: a second write could keep the timestamp, so it is hashed every time
    assert weights_digest([settled]) == changed and len(opened) == 3
