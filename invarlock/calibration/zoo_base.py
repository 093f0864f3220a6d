"""What every zoo family shares: the block matrices by role, seeded choices, the write-back
of an edited matrix, the edit's record, and round-to-nearest quantization.

Names and roles come from module names only (never from the guards' own tables), so that a
mistake in one is not mirrored in the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from invarlock.edits.result import EditResult
from invarlock.errors import InputError


class NotApplicable(InputError):
    """The zoo family has nothing to edit in this architecture (exit 2, one line)."""

_BLOCK = re.compile(r"\.(h|layers|layer|blocks)\.(\d+)\.")
# Leaf names by role; fused projections (GPT-NeoX/Falcon/BLOOM `query_key_value`, Phi-3
# `qkv_proj` and `gate_up_proj`, Baichuan `W_pack`) count as the inputs they fuse.
_ATTN_IN = ("q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value",
            "query_key_value", "qkv_proj", "Wqkv", "W_pack")
_ATTN_OUT = ("o_proj", "out_proj")
_FFN_IN = ("gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3", "gate_up_proj", "dense_h_to_4h")
_FFN_OUT = ("down_proj", "fc2", "w2", "dense_4h_to_h")
_ATTN_PARENTS = ("attn", "self_attn", "attention", "self_attention")
# norm leaf → the roles of the linears it feeds in a pre-norm block (LLaMA/Mistral/Qwen/
# Gemma/Phi-3, GPT-2, GPT-NeoX, BLOOM, Falcon, OPT). A parallel block with one norm
# (Falcon, GPT-J style) feeds the FFN from `input_layernorm` too; a block with a separate
# pre-FFN norm (Gemma 2/3) uses `post_attention_layernorm` on the attention output instead.
_NORM_FEEDS = {"input_layernorm": ("attn",), "ln_1": ("attn",), "ln_attn": ("attn",),
               "self_attn_layer_norm": ("attn",), "post_attention_layernorm": ("ffn",),
               "pre_feedforward_layernorm": ("ffn",), "ln_2": ("ffn",), "ln_mlp": ("ffn",),
               "final_layer_norm": ("ffn",)}
_FFN_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2", "ln_mlp",
              "final_layer_norm")


@dataclass(frozen=True)
class Block:
    """One block matrix: module name, module, [out, in] view of its weight, block index."""

    name: str
    module: Any
    layer: int

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def parent(self) -> str:
        return self.name.rsplit(".", 2)[-2] if self.name.count(".") >= 1 else ""

    @property
    def family(self) -> str:
        if self.leaf in _ATTN_IN + _ATTN_OUT or self.parent in _ATTN_PARENTS:
            return "attn"
        return "ffn"

    @property
    def is_output(self) -> bool:
        return self.leaf in _ATTN_OUT + _FFN_OUT or (
            self.leaf == "c_proj") or (  # GPT-2 attn.c_proj and mlp.c_proj
            self.leaf == "dense" and self.parent in _ATTN_PARENTS)  # GPT-NeoX/Falcon/BLOOM

    @property
    def is_input(self) -> bool:
        return self.leaf in _ATTN_IN + _FFN_IN

    def rows(self) -> torch.Tensor:
        """The weight as [out, in] (a view: writes go to the model)."""
        w = self.module.weight
        return w.t() if type(self.module).__name__ == "Conv1D" else w


def block_matrices(model: torch.nn.Module) -> list[Block]:
    out = []
    for name, module in model.named_modules():
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        match = _BLOCK.search(name + ".")
        if linear and match:
            out.append(Block(name, module, int(match.group(2))))
    return out


def _rng(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 7919 + salt)


def _pick(items: list[Any], gen: torch.Generator, what: str = "block matrices") -> Any:
    if not items:
        raise NotApplicable(f"the model has no {what} this zoo edit can change")
    return items[int(torch.randint(len(items), (1,), generator=gen))]


def _subset(items: list[Any], fraction: float, gen: torch.Generator) -> list[Any]:
    keep = torch.rand(len(items), generator=gen) < fraction
    chosen = [x for x, k in zip(items, keep.tolist(), strict=True) if k]
    return chosen or items[:1]


def _write(block: Block, w32: torch.Tensor) -> None:
    rows = block.rows()
    rows.copy_(w32.to(rows.dtype))


def _result(name: str, seed: int, blocks: list[Block], **plan: Any) -> EditResult:
    params = sum(b.module.weight.numel() for b in blocks)
    return EditResult(name, {"seed": seed, **plan}, tuple(b.name for b in blocks), params, 0.0)


def rtn(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric absmax round-to-nearest of a float32 [out, in] matrix, per row or group."""
    q = 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    g = in_f if group is None or in_f % group else group
    blocks = w.reshape(out_f, in_f // g, g)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / q
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(blocks / safe).clamp(-q, q) * scale).reshape(out_f, in_f)


TEXT_WINDOWS = 32  # held-out windows one data-aware edit calibrates on
BATCH = 8          # sequences per calibration forward pass


@dataclass(frozen=True, eq=False)
class CalibrationText:
    """Token windows of the evaluation corpus that no evaluation window contains: the text
    that data-aware families (GPTQ, Wanda, AWQ) size their edits from when a run asks for
    text calibration, as a real quantizer is calibrated on text, not on random tokens."""

    windows: torch.Tensor  # int64 [n, T], n >= 1

    def draw(self, gen: torch.Generator, sequences: int = TEXT_WINDOWS) -> torch.Tensor:
        """`sequences` whole windows drawn by `gen` (without replacement while the pool
        lasts)."""
        n = self.windows.shape[0]
        order = torch.randperm(n, generator=gen)
        return self.windows[order[torch.arange(sequences) % n]]


def calibration_ids(model: torch.nn.Module, gen: torch.Generator,
                    text: CalibrationText | None, sequences: int = 8,
                    length: int = 128) -> torch.Tensor:
    """Input ids a data-aware family calibrates on: `TEXT_WINDOWS` whole windows drawn
    from `text` (at least as many tokens as the widest matrix has inputs, so that XᵀX is
    not rank-deficient), or, without text, `sequences` × `length` seeded random tokens of
    the model's vocabulary (the zoo's recorded runs)."""
    if text is not None:
        return text.draw(gen)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    return torch.randint(1, max(vocab, 2), (sequences, length), generator=gen)


def calibration_record(ids: torch.Tensor, text: CalibrationText | None) -> dict[str, Any]:
    """What the edit's plan records about its calibration inputs (random tokens: only
    their count, as such plans have always been recorded)."""
    source = {} if text is None else {"calibration": "held-out windows"}
    return {**source, "calibration_tokens": int(ids.numel())}


def forward_batches(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Run `ids` through the model `BATCH` sequences at a time (hooks collect what they
    need), so that many long windows never hold their activations at once."""
    device = next(model.parameters()).device
    for i in range(0, ids.shape[0], BATCH):
        model(input_ids=ids[i:i + BATCH].to(device))


def input_grams(model: torch.nn.Module, blocks: list[Block], ids: torch.Tensor,
                diagonal: bool = False) -> list[torch.Tensor]:
    """XᵀX [in, in] (float64; only its diagonal [in] with `diagonal`) of each block
    matrix's inputs X [tokens, in] over the calibration ids (`calibration_ids`): the
    statistics that GPTQ (the Hessian) and Wanda (‖x_j‖ = √(XᵀX)_jj) size their edits from."""
    grams: dict[int, torch.Tensor] = {}
    handles = []
    for b in blocks:
        def hook(mod: Any, args: Any, key: int = id(b.module)) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            g = (x * x).sum(dim=0) if diagonal else x.t() @ x
            grams[key] = grams[key] + g if key in grams else g
        handles.append(b.module.register_forward_pre_hook(hook))
    try:
        forward_batches(model, ids)
    finally:
        for h in handles:
            h.remove()
    missing = [b.name for b in blocks if id(b.module) not in grams]
    if missing:
        raise NotApplicable(f"no calibration input reached {missing[0]}")
    return [grams[id(b.module)].cpu() for b in blocks]
