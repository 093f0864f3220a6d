"""Module families by name, shared by edits (scope) and guards (per-family thresholds).

Pure string logic over dotted module paths as they appear in Hugging Face checkpoints
(GPT-2, LLaMA/Mistral/Qwen2, BERT, OPT, GPT-NeoX), so it can be tested without torch.
"""

from __future__ import annotations

from invarlock.enums import Family

_EMBED_LEAVES = {
    "wte", "wpe", "embed_tokens", "embed_positions", "word_embeddings",
    "position_embeddings", "token_type_embeddings", "embed_in",
}
_ATTN_CONTAINERS = {"attn", "self_attn", "attention", "self_attention", "crossattention"}
_ATTN_LEAVES = {
    "c_attn", "q_attn", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query",
    "key", "value", "query_key_value", "qkv_proj", "Wqkv", "W_pack",
}
_FFN_CONTAINERS = {"mlp", "feed_forward", "ffn", "intermediate", "block_sparse_moe"}
_FFN_LEAVES = {
    "c_fc", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "gate_up_proj",
    "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3",
}
_ATTN_OUTPUT_LEAVES = {"o_proj", "out_proj"}
_FFN_OUTPUT_LEAVES = {"down_proj", "fc2", "dense_4h_to_h", "w2"}


def module_name(param_name: str) -> str:
    """Strip a trailing `.weight`/`.bias` so parameter and module names compare equal."""
    for suffix in (".weight", ".bias"):
        if param_name.endswith(suffix):
            return param_name[: -len(suffix)]
    return param_name


def family_of(name: str) -> Family:
    """Family of a module (or parameter) path; `other` when nothing matches."""
    parts = module_name(name).split(".")
    leaf = parts[-1]
    containers = set(parts[:-1])
    if leaf in _EMBED_LEAVES:
        return Family.EMBED
    # BERT: `attention.output.dense` is attention, `layer.N.output.dense` is FFN.
    if containers & _ATTN_CONTAINERS or leaf in _ATTN_LEAVES:
        return Family.ATTN
    if containers & _FFN_CONTAINERS or leaf in _FFN_LEAVES:
        return Family.FFN
    if leaf == "dense" and len(parts) >= 2 and parts[-2] == "output" and _in_block(parts):
        return Family.FFN
    return Family.OTHER


def is_block_output_projection(name: str) -> bool:
    """True for the projection that writes a block's attention or FFN output into the residual.

    These are where variance equalisation taps activations (pre-residual).
    """
    parts = module_name(name).split(".")
    leaf = parts[-1]
    containers = set(parts[:-1])
    if leaf in _ATTN_OUTPUT_LEAVES or leaf in _FFN_OUTPUT_LEAVES:
        return True
    if leaf == "c_proj" and containers & (_ATTN_CONTAINERS | _FFN_CONTAINERS):
        return True  # GPT-2: attn.c_proj and mlp.c_proj
    if leaf == "dense" and len(parts) >= 2 and parts[-2] == "output" and _in_block(parts):
        return True  # BERT: attention.output.dense and output.dense
    # GPT-NeoX / Falcon attention output
    return leaf == "dense" and bool(containers & {"attention", "self_attention"})


def block_index(name: str) -> int | None:
    """Index of the transformer block a module belongs to, or None outside blocks."""
    parts = module_name(name).split(".")
    for i, part in enumerate(parts[:-1]):
        if part in {"h", "layers", "layer", "blocks", "block"} and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _in_block(parts: list[str]) -> bool:
    return block_index(".".join(parts)) is not None
