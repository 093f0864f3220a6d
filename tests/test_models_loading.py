"""Loading for scoring, tensor fingerprints and atomic checkpoint saving."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from invarlock.enums import AdapterKind
from invarlock.errors import InputError
from invarlock.models import loading
from invarlock.models.loading import load_model, load_tokenizer, save_checkpoint, tensor_digest
from invarlock.models.source import resolve_model_source, weight_files, weights_digest


def _load(path: Path, **kwargs):
    return load_model(resolve_model_source(str(path)), **kwargs)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return _load(tiny_gpt2_dir)


@pytest.fixture
def pickle_dir(tiny_gpt2_dir, tmp_path, gpt2) -> Path:
    """The tiny GPT-2 as a pickle-only checkpoint (pytorch_model.bin, no safetensors)."""
    out = tmp_path / "pickled"
    shutil.copytree(tiny_gpt2_dir, out)
    (out / "model.safetensors").unlink()
    torch.save(gpt2.model.state_dict(), out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize(("fixture", "adapter", "architecture"), [
    ("tiny_gpt2_dir", AdapterKind.CAUSAL_LM, "GPT2LMHeadModel"),
    ("tiny_llama_dir", AdapterKind.CAUSAL_LM, "LlamaForCausalLM"),
    ("tiny_bert_dir", AdapterKind.MASKED_LM, "BertForMaskedLM"),
    ("tiny_classifier_dir", AdapterKind.SEQ_CLS, "BertForSequenceClassification"),
])
def test_load_ready_for_scoring(fixture, adapter, architecture, request):
    path = request.getfixturevalue(fixture)
    loaded = _load(path)
    assert loaded.adapter is adapter and loaded.architecture == architecture
    assert type(loaded.model).__name__ == architecture
    assert not loaded.model.training and not any(m.training for m in loaded.model.modules())
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.device == "cpu" and loaded.dtype is torch.float32
    assert next(loaded.model.parameters()).dtype is torch.float32
    assert loaded.parameters == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.weights_digest == weights_digest(weight_files(path))
    assert len(loaded.tokenizer) == loaded.model.get_input_embeddings().weight.shape[0]


def test_tied_parameters_counted_once(gpt2):
    model = gpt2.model
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(t.numel() for t in model.state_dict().values())
    assert gpt2.parameters == total - model.lm_head.weight.numel()


def test_explicit_dtype(tiny_llama_dir):
    loaded = _load(tiny_llama_dir, dtype="bfloat16")
    assert loaded.dtype is torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_loading_is_quiet(tiny_llama_dir, capfd):
    _load(tiny_llama_dir)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_pickle_refused_without_allow(pickle_dir):
    with pytest.raises(InputError, match="--allow-pickle"):
        _load(pickle_dir)


def test_pickle_loads_with_allow(pickle_dir, gpt2):
    loaded = _load(pickle_dir, allow_pickle=True)
    assert tensor_digest(loaded.model) == tensor_digest(gpt2.model)
    assert loaded.weights_digest == weights_digest([pickle_dir / "pytorch_model.bin"])


class _Payload:
    """Unpickling this would create a file: torch's weights-only loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_even_when_allowed(pickle_dir, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": _Payload(marker)}, pickle_dir / "pytorch_model.bin")
    with pytest.raises(InputError, match="refused by torch's weights-only loader"):
        _load(pickle_dir, allow_pickle=True)
    assert not marker.exists()


def test_checkpoint_missing_head_weights_is_refused(tiny_gpt2_dir):
    with pytest.raises(InputError, match=r"has no weights for 1 parameter\(s\) of "
                                         r"GPT2ForSequenceClassification \(first: score.weight\)"):
        _load(tiny_gpt2_dir, adapter=AdapterKind.SEQ_CLS)


def test_remote_code_checkpoint_is_refused(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "custom"
    shutil.copytree(tiny_gpt2_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="gpt2_custom",
                  auto_map={"AutoModelForCausalLM": "modeling_custom.Custom"})
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="InvarLock never runs remote code"):
        _load(out)


def test_corrupt_weights_are_one_input_error(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(tiny_gpt2_dir, out)
    (out / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match=r"^cannot load model '.*corrupt'"):
        _load(out)


def test_load_tokenizer(tiny_bert_dir):
    tokenizer = load_tokenizer(tiny_bert_dir)
    assert tokenizer.mask_token == "[MASK]" and len(tokenizer) == 512


# --- tensor digest -----------------------------------------------------------------------


def test_tensor_digest_equal_for_identical_models(tiny_gpt2_dir, gpt2):
    again = _load(tiny_gpt2_dir)
    assert tensor_digest(again.model) == tensor_digest(gpt2.model)
    assert tensor_digest(copy.deepcopy(gpt2.model)) == tensor_digest(gpt2.model)


def test_tensor_digest_changes_with_one_weight(gpt2):
    edited = copy.deepcopy(gpt2.model)
    with torch.no_grad():
        edited.transformer.h[1].mlp.c_fc.weight[3, 5] += 1e-3
    assert tensor_digest(edited) != tensor_digest(gpt2.model)


def test_tensor_digest_counts_tied_weights_once(gpt2):
    tied = gpt2.model
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    # Same values, but an untied head is a separate tensor and is hashed on its own.
    assert tensor_digest(untied) != tensor_digest(tied)


def test_tensor_digest_depends_on_dtype(gpt2):
    assert tensor_digest(copy.deepcopy(gpt2.model).to(torch.bfloat16)) != tensor_digest(
        gpt2.model)


# --- saving ------------------------------------------------------------------------------


def test_save_checkpoint_round_trips(gpt2, tmp_path, capfd):
    out = tmp_path / "saved"
    save_checkpoint(gpt2, out)
    assert capfd.readouterr() == ("", "")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert tensor_digest(reloaded) == tensor_digest(gpt2.model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, gpt2.model(ids).logits)
    assert os.listdir(tmp_path) == ["saved"]  # no staging directory left behind


def test_save_checkpoint_into_existing_empty_dir(gpt2, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    save_checkpoint(gpt2, out)
    assert (out / "model.safetensors").is_file()


def test_save_checkpoint_refuses_to_overwrite(gpt2, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="refusing to overwrite"):
        save_checkpoint(gpt2, out)
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_nothing(gpt2, tmp_path, monkeypatch, error):
    loaded = copy.copy(gpt2)
    loaded.tokenizer = copy.deepcopy(gpt2.tokenizer)

    def fail_midway(directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{partial")
        raise error

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", fail_midway)
    out = tmp_path / "out" / "subject"
    expected = InputError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        save_checkpoint(loaded, out)
    assert not out.exists()
    assert os.listdir(tmp_path / "out") == []


def test_folders_with_the_same_tokenizer_files_share_one_tokenizer(tiny_gpt2_dir, tmp_path,
                                                                   monkeypatch):
    """Weights may differ; every other file decides whether the tokenizer is loaded again."""
    monkeypatch.setattr(loading, "_TOKENIZERS", {})
    first = load_tokenizer(tiny_gpt2_dir)
    same = shutil.copytree(tiny_gpt2_dir, tmp_path / "same")
    (same / "model.safetensors").write_bytes(b"other weights")
    assert load_tokenizer(same) is first
    other = shutil.copytree(tiny_gpt2_dir, tmp_path / "other")
    config = other / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 77}))
    changed = load_tokenizer(other)
    assert changed is not first and changed.model_max_length == 77


def test_load_options_in_a_tokenizer_config_do_not_make_another_tokenizer(tiny_gpt2_dir,
                                                                          tmp_path,
                                                                          monkeypatch):
    """A tokenizer re-saved after a local load records local_files_only: every load gives
    that option itself, so the file's value (or its layout) cannot change the tokenizer."""
    monkeypatch.setattr(loading, "_TOKENIZERS", {})
    first = load_tokenizer(tiny_gpt2_dir)
    resaved = shutil.copytree(tiny_gpt2_dir, tmp_path / "resaved")
    config = resaved / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.update(local_files_only=True, trust_remote_code=False)
    config.write_text(json.dumps(settings, indent=4))
    assert load_tokenizer(resaved) is first


def test_a_folder_with_a_large_file_besides_weights_is_always_loaded(tiny_gpt2_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(loading, "_TOKENIZERS", {})
    monkeypatch.setattr(loading, "_TOKENIZER_INPUT_MAX", 100)
    assert loading._tokenizer_inputs(tiny_gpt2_dir) is None  # tokenizer.json is larger
    assert load_tokenizer(tiny_gpt2_dir) is not load_tokenizer(tiny_gpt2_dir)
