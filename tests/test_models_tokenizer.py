"""Tokenizer hash and the readable differences between two tokenizers."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from invarlock.models.tokenizer import PROBES, tokenizer_differences, tokenizer_hash
from tests.tinymodels import train_bpe_tokenizer


@pytest.fixture(scope="module")
def bpe_600(tmp_path_factory):
    return AutoTokenizer.from_pretrained(
        train_bpe_tokenizer(tmp_path_factory.mktemp("bpe600"), vocab_size=600))


def test_hash_format_and_identical_copies(bpe, bpe_tokenizer_dir, tmp_path):
    digest = tokenizer_hash(bpe)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    copy_dir = tmp_path / "copy"
    shutil.copytree(bpe_tokenizer_dir, copy_dir)
    again = AutoTokenizer.from_pretrained(copy_dir)
    assert tokenizer_hash(again) == digest
    assert tokenizer_differences(bpe, again) == []


def test_hash_survives_resave(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_hash(bpe)


def test_hash_ignores_call_time_padding_and_truncation(wordpiece_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    before = tokenizer_hash(tokenizer)
    tokenizer(["short", "a much longer line of text"], padding="max_length", truncation=True,
              max_length=8)
    assert tokenizer_hash(tokenizer) == before


def test_differently_trained_tokenizers(bpe, bpe_600):
    assert tokenizer_hash(bpe) != tokenizer_hash(bpe_600)
    lines = tokenizer_differences(bpe, bpe_600)
    assert lines[0] == "vocab size 512 vs 600"
    assert "vocab differs: 88 token(s) in only one" in lines
    assert "merges differ (255 vs 343)" in lines
    probes = [line for line in lines if line.endswith("probe strings tokenize differently")]
    assert len(probes) == 1 and probes[0].endswith(f"of {len(PROBES)} probe strings tokenize "
                                                   "differently")
    assert int(probes[0].split()[0]) > 0


def test_special_token_difference(bpe_tokenizer_dir):
    a = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    b.add_special_tokens({"eos_token": "</s>"})
    lines = tokenizer_differences(a, b)
    assert "vocab size 512 vs 513" in lines
    assert "special token eos_token '<|endoftext|>' vs '</s>'" in lines
    assert "added tokens differ (1 vs 2)" in lines


def test_normalizer_difference(wordpiece_tokenizer_dir):
    from tokenizers import normalizers

    a = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    b.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    lines = tokenizer_differences(a, b)
    assert "normalizer differs" in lines
    assert not any(line.startswith(("vocab", "merges")) for line in lines)
    assert any(line.endswith("probe strings tokenize differently") for line in lines)


def test_model_kind_difference(bpe, wordpiece):
    lines = tokenizer_differences(bpe, wordpiece)
    assert "tokenizer model BPE vs WordPiece" in lines
    assert "pre-tokenizer differs" in lines
    assert "special token eos_token '<|endoftext|>' vs none" in lines
