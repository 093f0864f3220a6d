"""Shared fixtures: tiny seeded models and tokenizers, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: force the Hugging Face libraries offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("INVARLOCK_ALLOW_NETWORK", None)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    from tests.tinymodels import train_bpe_tokenizer

    return train_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def wordpiece_tokenizer_dir(tmp_path_factory) -> Path:
    from tests.tinymodels import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="session")
def bpe(bpe_tokenizer_dir):
    """The tiny byte-level BPE tokenizer, loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def wordpiece(wordpiece_tokenizer_dir):
    """The tiny WordPiece tokenizer, loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    from tests.tinymodels import build_gpt2

    return build_gpt2(tmp_path_factory.mktemp("gpt2"), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    from tests.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("llama"), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, bpe_tokenizer_dir):
    """Qwen2 layout: biased q/k/v projections, grouped-query attention, rotary positions."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tinymodels import _save, _vocab_size

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=_vocab_size(bpe_tokenizer_dir), hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=0, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases, so that the rescaling must scale them too
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return _save(model, bpe_tokenizer_dir, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def tiny_causal_dirs(tmp_path_factory, bpe_tokenizer_dir) -> dict[str, Path]:
    """{architecture: folder} for every tinymodels.OTHER_CAUSAL architecture."""
    from tests.tinymodels import OTHER_CAUSAL, build_causal

    return {arch: build_causal(arch, tmp_path_factory.mktemp(arch), bpe_tokenizer_dir)
            for arch in OTHER_CAUSAL}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, wordpiece_tokenizer_dir) -> Path:
    from tests.tinymodels import build_bert_mlm

    return build_bert_mlm(tmp_path_factory.mktemp("bert"), wordpiece_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, wordpiece_tokenizer_dir) -> Path:
    from tests.tinymodels import build_bert_classifier

    return build_bert_classifier(tmp_path_factory.mktemp("cls"), wordpiece_tokenizer_dir)


@pytest.fixture(scope="session")
def labelled_jsonl(tmp_path_factory) -> Path:
    from tests.tinymodels import write_labelled_jsonl

    return write_labelled_jsonl(tmp_path_factory.mktemp("cls-data") / "labelled.jsonl")


@pytest.fixture(scope="session")
def sonnets_path() -> Path:
    from tests.tinymodels import SONNETS

    return SONNETS
