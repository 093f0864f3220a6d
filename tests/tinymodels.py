"""Tiny random models and tokenizers built from configs, for tests (no downloads).

Every builder is seeded, so two calls give bit-identical checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
SONNETS = DATA / "sonnets.txt"


def train_bpe_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Byte-level BPE (GPT-2 style) trained on the sonnets; saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([str(SONNETS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def train_wordpiece_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """BERT-style WordPiece with [CLS]/[SEP]/[MASK]/[PAD]/[UNK], trained on the sonnets."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        show_progress=False)
    tok.train([str(SONNETS)], trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def _save(model, tokenizer_dir: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


def build_gpt2(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = _vocab_size(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(cfg).eval(), tokenizer_dir, out_dir)


def build_llama(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = _vocab_size(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                      tie_word_embeddings=False)
    return _save(LlamaForCausalLM(cfg).eval(), tokenizer_dir, out_dir)


# Causal LMs of other layouts: fused q/k/v (GPT-NeoX, Phi-3, Falcon), fused gate/up
# (Phi-3), (1 + γ) norms (Gemma RMSNorm, Nemotron LayerNorm1P), sandwich norms (Gemma 2),
# one norm feeding attention and FFN in parallel (Falcon), biased LayerNorms (OPT), q/k
# norms (Qwen3).
OTHER_CAUSAL = {
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 8}),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               {"hidden_size": 32, "num_attention_heads": 4}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            {"hidden_size": 32, "ffn_dim": 64, "num_attention_heads": 4,
             "word_embed_proj_dim": 32}),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM",
                 {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 8}),
}


def build_causal(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0,
                 **overrides) -> Path:
    """A two-layer random causal LM of one of the `OTHER_CAUSAL` architectures."""
    import torch
    import transformers

    config_name, model_name, kwargs = OTHER_CAUSAL[arch]
    vocab = _vocab_size(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(
        vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=128, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, **{**kwargs, **overrides})
    model = getattr(transformers, model_name)(cfg).eval()
    return _save(model, tokenizer_dir, out_dir)


def build_bert_mlm(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    vocab = _vocab_size(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     pad_token_id=0)
    return _save(BertForMaskedLM(cfg).eval(), tokenizer_dir, out_dir)


def build_bert_classifier(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    vocab = _vocab_size(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     pad_token_id=0, num_labels=2)
    return _save(BertForSequenceClassification(cfg).eval(), tokenizer_dir, out_dir)


def write_labelled_jsonl(path: Path, n: int = 120) -> Path:
    """Sonnet lines labelled by a simple, learnable rule (does the line end with a comma?)."""
    lines = [ln.strip() for ln in SONNETS.read_text().splitlines() if len(ln.strip()) > 20]
    rows = [{"text": ln, "label": int(ln.endswith(","))} for ln in lines[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vocab_size(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))
