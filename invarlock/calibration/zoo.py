"""Edit zoo for calibration and false-alarm testing: benign families the guards must pass and
harmful ones they must catch.

Every edit is seeded (the seed picks modules, scales, noise) and written here independently
of the product's own edits and of the guards' measurement code, so a mistake in one is not
mirrored in the other. Edits touch weights in place on an in-memory copy of the baseline.

Benign (the function barely moves, or not at all):
  rtn8_channel   RTN 8-bit, one scale per output channel (seed: which ~75% of the matrices)
  rtn8_group     RTN 8-bit per group of 32/64/128 inputs (seed: the group size)
  fp16, bf16     round trip of the block weights through half precision (seed: the matrices)
  noise          uniform noise of one INT8 step per output channel (`quant_noise`)
  prune          magnitude pruning at 2–10% sparsity per matrix (seed: the sparsity)
  normfold_one / normfold_some / normfold_all
                 function-preserving: per-channel scales s (log-uniform in [1/4, 4]) folded
                 between a norm and the linears it feeds, (γ, β) ← (γ, β)/s, W ← W·diag(s), in one
                 layer, a third of the layers, or every layer (SmoothQuant/AWQ); a norm that
                 scales by (1 + γ) (Gemma) gets 1 + γ ← (1 + γ)/s
  lowrank        a rank-4 update merged into every attention input projection, its spectral
                 norm 2% of the matrix's (a small LoRA merge)
  rtn4_group     RTN 4-bit per group of 128 inputs (seed: which ~90% of the matrices)
  qk_scale       function-preserving, SmoothAttention-style: query channels ×λ, key channels
                 ×1/λ, λ log-uniform in [0.5, 2] per key head (grouped-query aware) and rotary
                 pair; under per-head q/k norms (Qwen3) their scales instead
  awq_scale      function-preserving, AWQ-style: activation-aware s (mean |x|^α on a forward
                 pass of seeded tokens) on the inputs of the value consumer (o_proj, c_proj,
                 dense) and down_proj, 1/s on the value channels and up rows
  awq_rtn4       awq_scale, then rtn4_group on every block matrix (AWQ's scale-then-quantize)
  vo_scale, updown_scale
                 awq_scale's value → output pair alone, and its up → down pair alone
  gptq4          GPTQ-style 4-bit per group of 128 with error feedback through the inverse
                 Hessian of seeded calibration inputs (`zoo_gptq`)
  prune24, wanda 2:4 magnitude pruning; Wanda |W|·‖x‖ pruning at 50% per row (`zoo_prune`)

Harmful (the guards should catch them):
  scale3         one block matrix ×3 (not q/k under q/k norms, whose scale is normalised away)
  outproj_half   one block's attention or FFN output projection ×0.5
  outlier_rows   8 output channels of one FFN input matrix ×25
  family_scale   every matrix of one family (attention or FFN) ×1.5
  swap_layers    two blocks exchange all their weights
  rtn4           RTN 4-bit per output channel without groups, every block matrix
  rtn2_group     RTN 2-bit per group of 32 inputs, every block matrix
  nan            one NaN in one block matrix
  vocab_permute, rows_zero, rows_spike
                 embedding/head rows of tokens the evaluation windows never contain:
                 permuted among themselves, 16 zeroed, 16 with one spiked entry (`zoo_vocab`)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from invarlock.calibration.zoo_base import (
    _ATTN_IN,
    _BLOCK,
    _FFN_NORMS,
    _NORM_FEEDS,
    Block,
    NotApplicable,
    _pick,
    _result,
    _rng,
    _subset,
    _write,
    block_matrices,
    rtn,
)
from invarlock.calibration.zoo_gptq import gptq4
from invarlock.calibration.zoo_prune import prune24, wanda
from invarlock.calibration.zoo_vocab import VOCAB
from invarlock.edits.result import EditResult

# --- benign ------------------------------------------------------------------------------


def rtn8_channel(model: torch.nn.Module, seed: int) -> EditResult:
    blocks = block_matrices(model)
    chosen = blocks if seed == 0 else _subset(blocks, 0.75, _rng(seed, 1))
    for b in chosen:
        _write(b, rtn(b.rows().float(), 8, None))
    return _result("rtn8_channel", seed, chosen)


def rtn8_group(model: torch.nn.Module, seed: int) -> EditResult:
    group = (32, 64, 128)[seed % 3]
    blocks = block_matrices(model)
    for b in blocks:
        _write(b, rtn(b.rows().float(), 8, group))
    return _result("rtn8_group", seed, blocks, group_size=group)


def _round_trip(dtype: torch.dtype, label: str) -> Callable[[torch.nn.Module, int], EditResult]:
    def edit(model: torch.nn.Module, seed: int) -> EditResult:
        blocks = block_matrices(model)
        chosen = blocks if seed == 0 else _subset(blocks, 0.75, _rng(seed, 2))
        for b in chosen:
            _write(b, b.rows().float().to(dtype).float())
        return _result(label, seed, chosen)
    return edit


def noise(model: torch.nn.Module, seed: int) -> EditResult:
    blocks = block_matrices(model)
    gen = _rng(seed, 3)
    for b in blocks:
        w = b.rows().float()
        step = w.abs().amax(dim=1, keepdim=True) / 127
        _write(b, w + (torch.rand(w.shape, generator=gen).to(w.device) - 0.5) * step)
    return _result("noise", seed, blocks)


def prune(model: torch.nn.Module, seed: int) -> EditResult:
    gen = _rng(seed, 4)
    sparsity = 0.02 + 0.08 * float(torch.rand(1, generator=gen))
    blocks = block_matrices(model)
    for b in blocks:
        w = b.rows().float()
        k = int(sparsity * w.numel())
        if k:
            cut = w.abs().flatten().kthvalue(k).values
            _write(b, torch.where(w.abs() <= cut, torch.zeros_like(w), w))
    return _result("prune", seed, blocks, sparsity=round(sparsity, 4))


def _norm_folds(model: torch.nn.Module) -> list[tuple[int, Any, list[Block]]]:
    """(layer, norm module, the linears it feeds) for every foldable norm, by name.

    Post-norm blocks (OPT with `do_layer_norm_before` false, BLOOM/Falcon with the residual
    taken after the norm) also send the norm's output into the residual stream, so no
    rescaling there preserves the function: they have none."""
    config = getattr(model, "config", None)
    if not getattr(config, "do_layer_norm_before", True) or getattr(
            config, "apply_residual_connection_post_layernorm", False):
        return []
    modules = dict(model.named_modules())
    blocks = block_matrices(model)
    out = []
    for name, module in modules.items():
        leaf = name.rsplit(".", 1)[-1]
        match = _BLOCK.search(name + ".")
        if leaf not in _NORM_FEEDS or match is None or getattr(module, "weight", None) is None:
            continue
        parent = name.rsplit(".", 1)[0]
        siblings = {n.rsplit(".", 1)[-1] for n in modules if n.startswith(parent + ".")}
        roles = set(_NORM_FEEDS[leaf])
        if leaf == "input_layernorm" and not siblings & set(_FFN_NORMS):
            roles.add("ffn")  # one norm feeds attention and FFN in parallel
        if leaf == "post_attention_layernorm" and siblings & {
                "pre_feedforward_layernorm", "post_feedforward_layernorm"}:
            continue  # normalises the attention output (Gemma 2/3, OLMo 2): feeds no linear
        fed = [b for b in blocks if b.name.startswith(parent + ".") and b.is_input and
               b.family in roles and b.layer == int(match.group(2))]
        if fed:
            out.append((int(match.group(2)), module, fed))
    return out


def _scale_offset(norm: Any) -> float:
    """1.0 for a norm that scales by (1 + γ) (Gemma's RMSNorm), else 0.0: with γ (and β)
    zeroed, a plain norm outputs zeros, an offset one its normalised input."""
    saved = [(p, p.detach().clone()) for p in (norm.weight, getattr(norm, "bias", None))
             if isinstance(p, torch.Tensor)]
    try:
        for p, _ in saved:
            p.zero_()
        x = torch.linspace(-1.0, 2.0, norm.weight.shape[0], device=norm.weight.device)
        out = norm(x.to(norm.weight.dtype)[None, :])
    finally:
        for p, value in saved:
            p.copy_(value)
    return 1.0 if bool(out.abs().amax() > 0) else 0.0


def _normfold(fraction: str) -> Callable[[torch.nn.Module, int], EditResult]:
    def edit(model: torch.nn.Module, seed: int) -> EditResult:
        gen = _rng(seed, 5)
        folds = _norm_folds(model)
        layers = sorted({layer for layer, _, _ in folds})
        if not layers:
            raise NotApplicable(f"normfold_{fraction}: no pre-norm in {type(model).__name__} "
                             "feeds a known linear, so no rescaling preserves the function")
        if fraction == "one":
            chosen = {_pick(layers, gen)}
        elif fraction == "some":
            k = max(1, math.ceil(len(layers) / 3))
            chosen = {layers[int(i)] for i in torch.randperm(len(layers), generator=gen)[:k]}
        else:
            chosen = set(layers)
        touched: list[Block] = []
        for layer, norm, fed in folds:
            if layer not in chosen:
                continue
            gamma, beta = norm.weight, getattr(norm, "bias", None)
            s = torch.exp((torch.rand(gamma.shape[0], generator=gen) * 2 - 1) * math.log(4.0))
            s = s.to(gamma.device)
            offset = _scale_offset(norm)
            if offset:  # (1 + γ) / s = 1 + γ'
                gamma.copy_(((gamma.float() + offset) / s - offset).to(gamma.dtype))
            else:
                gamma.copy_((gamma.float() / s).to(gamma.dtype))
            if beta is not None:  # LayerNorm: γ·x̂ + β, both scaled
                beta.copy_((beta.float() / s).to(beta.dtype))
            for b in fed:
                if type(b.module).__name__ == "Conv1D":  # weight [in, out]: input rows
                    w = b.module.weight
                    w.copy_((w.float() * s[:, None]).to(w.dtype))
                else:
                    _write(b, b.rows().float() * s[None, :])
            touched += fed
        return _result(f"normfold_{fraction}", seed, touched, layers=sorted(chosen))
    return edit


def lowrank(model: torch.nn.Module, seed: int) -> EditResult:
    gen = _rng(seed, 6)
    chosen = [b for b in block_matrices(model) if b.leaf in _ATTN_IN]
    if not chosen:
        raise NotApplicable("lowrank: the model has no attention input projection this zoo "
                         "edit can change")
    for b in chosen:
        w = b.rows().float()
        a = torch.randn(w.shape[0], 4, generator=gen).to(w.device)
        c = torch.randn(4, w.shape[1], generator=gen).to(w.device)
        delta = a @ c
        scale = 0.02 * torch.linalg.matrix_norm(w, ord=2) / torch.linalg.matrix_norm(
            delta, ord=2)
        _write(b, w + scale * delta)
    return _result("lowrank", seed, chosen, rank=4, relative_norm=0.02)


def rtn4_group(model: torch.nn.Module, seed: int) -> EditResult:
    """4-bit RTN per group of 128 inputs (what 4-bit deployments ship), every block matrix;
    seeds differ only in the matrices kept in full precision (none for seed 0)."""
    blocks = block_matrices(model)
    chosen = blocks if seed == 0 else _subset(blocks, 0.9, _rng(seed, 7))
    for b in chosen:
        _write(b, rtn(b.rows().float(), 4, 128))
    return _result("rtn4_group", seed, chosen, group_size=128)


@dataclass(frozen=True)
class Attention:
    """One attention layer's q/k/v outputs and the consumer of its values, as (module,
    output feature indices); fused projections give index ranges of one module."""

    q: tuple[Any, torch.Tensor]
    k: tuple[Any, torch.Tensor]
    v: tuple[Any, torch.Tensor]
    o: Any
    qk_norms: tuple[Any, Any] | None  # (q_norm, k_norm) per head, when q/k are normalised


def _head_layout(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(query heads, key/value heads, head dim, rotary dims) from the config."""
    cfg = model.config
    n_q = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_q)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q)
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", 1.0) if rope else 0.0
    return n_q, n_kv, d, int(d * float(factor)) // 2 * 2


_FUSED_QKV = {"c_attn": "c_proj", "qkv_proj": "o_proj"}  # [q; k; v] → the value consumer


def _attentions(model: torch.nn.Module) -> list[Attention]:
    """Attention layers by module names: separate q/k/v/o projections (LLaMA, Qwen, Gemma,
    Mistral, OPT), GPT-2 `c_attn` → `c_proj`, Phi-3 `qkv_proj` → `o_proj`, GPT-NeoX
    per-head `query_key_value` → `dense`."""
    if getattr(getattr(model, "config", None), "num_attention_heads", None) is None:
        return []
    n_q, n_kv, d, _ = _head_layout(model)
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        leaf, parent = name.rsplit(".", 1)[-1], name.rsplit(".", 1)[0]
        norms = (modules.get(f"{parent}.q_norm"), modules.get(f"{parent}.k_norm"))
        norms = norms if all(n is not None for n in norms) else None
        if leaf == "q_proj" and all(f"{parent}.{x}" in modules for x in ("k_proj", "v_proj")):
            o = modules.get(f"{parent}.o_proj") or modules.get(f"{parent}.out_proj")
            if o is None:
                continue
            out.append(Attention((m, torch.arange(n_q * d)),
                                 (modules[f"{parent}.k_proj"], torch.arange(n_kv * d)),
                                 (modules[f"{parent}.v_proj"], torch.arange(n_kv * d)), o,
                                 norms))
        elif leaf in _FUSED_QKV and f"{parent}.{_FUSED_QKV[leaf]}" in modules:
            o = modules[f"{parent}.{_FUSED_QKV[leaf]}"]
            if Block(name, m, 0).rows().shape[0] != (n_q + 2 * n_kv) * d:
                continue
            q, k = torch.arange(n_q * d), n_q * d + torch.arange(n_kv * d)
            out.append(Attention((m, q), (m, k), (m, (n_q + n_kv) * d + torch.arange(n_kv * d)),
                                 o, norms))
        elif leaf == "query_key_value" and model.config.model_type == "gpt_neox":
            per_head = torch.arange(n_q)[:, None] * 3 * d
            j = torch.arange(d)[None, :]
            out.append(Attention((m, (per_head + j).flatten()), (m, (per_head + d + j).flatten()),
                                 (m, (per_head + 2 * d + j).flatten()),
                                 modules[f"{parent}.dense"], norms))
    return out


def _scale_outputs(module: Any, index: torch.Tensor, factor: torch.Tensor) -> None:
    """Output features `index` of a Linear/Conv1D (weight and bias) times `factor`."""
    w = module.weight
    f = factor.to(device=w.device, dtype=torch.float32)
    if type(module).__name__ == "Conv1D":  # [in, out]
        w[:, index] = (w[:, index].float() * f[None, :]).to(w.dtype)
    else:
        w[index] = (w[index].float() * f[:, None]).to(w.dtype)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias[index] = (bias[index].float() * f).to(bias.dtype)


def _scale_inputs(module: Any, index: torch.Tensor, factor: torch.Tensor) -> None:
    w = module.weight
    f = factor.to(device=w.device, dtype=torch.float32)
    if type(module).__name__ == "Conv1D":
        w[index] = (w[index].float() * f[:, None]).to(w.dtype)
    else:
        w[:, index] = (w[:, index].float() * f[None, :]).to(w.dtype)


def _qk_scales(gen: torch.Generator, n_kv: int, d: int, rotary: int) -> torch.Tensor:
    """λ ∈ [0.5, 2] (log-uniform) per key head and head channel, equal on both members of
    each rotary pair (j, j + r/2), so that RoPE still commutes with it. [n_kv, d]"""
    classes = d - rotary // 2
    lam = torch.exp((torch.rand(n_kv, classes, generator=gen) * 2 - 1) * math.log(2.0))
    j = torch.arange(d)
    cls = torch.where(j < rotary, j % max(rotary // 2, 1), rotary // 2 + j - rotary)
    return lam[:, cls]


def qk_scale(model: torch.nn.Module, seed: int) -> EditResult:
    """SmoothAttention-style: query channels ×λ, key channels ×1/λ, λ per key head (shared
    by its group of query heads) and rotary pair; under q/k norms, their scales instead."""
    attentions = _attentions(model)
    if not attentions:
        raise NotApplicable("qk_scale: no attention layer with a known q/k layout")
    gen = _rng(seed, 8)
    n_q, n_kv, d, rotary = _head_layout(model)
    touched = []
    for att in attentions:
        if att.qk_norms is not None:  # q_norm(x)·γ: a scale on γ_q, its inverse on γ_k
            lam = _qk_scales(gen, 1, d, rotary)[0]
            for norm, f in zip(att.qk_norms, (lam, 1 / lam), strict=True):
                offset = _scale_offset(norm)
                g = norm.weight
                g.copy_(((g.float() + offset) * f.to(g.device) - offset).to(g.dtype))
            touched.append(att.q[0])
            continue
        lam = _qk_scales(gen, n_kv, d, rotary)                      # [n_kv, d]
        q_lam = lam.repeat_interleave(n_q // n_kv, dim=0).flatten()  # query head h: h // group
        _scale_outputs(att.q[0], att.q[1], q_lam)
        _scale_outputs(att.k[0], att.k[1], 1 / lam.flatten())
        touched += [att.q[0]] + ([att.k[0]] if att.k[0] is not att.q[0] else [])
    blocks = [b for b in block_matrices(model) if any(b.module is m for m in touched)]
    return _result("qk_scale", seed, blocks)


def _input_magnitudes(model: torch.nn.Module, modules: list[Any],
                      gen: torch.Generator) -> list[torch.Tensor]:
    """Mean |x| per input channel of each module on one forward pass of seeded random
    tokens (the activation statistics AWQ sizes its scales from)."""
    sums: dict[int, torch.Tensor] = {}
    handles = []
    for m in modules:
        def hook(mod: Any, args: Any, key: int = id(m)) -> None:
            x = args[0].detach().float()
            sums[key] = x.abs().reshape(-1, x.shape[-1]).mean(dim=0)
        handles.append(m.register_forward_pre_hook(hook))
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = torch.randint(1, max(vocab, 2), (2, 32), generator=gen)
    try:
        model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return [sums[id(m)] for m in modules]


_Pair = tuple[Any, torch.Tensor, Any, torch.Tensor]  # producer, its rows, consumer,
                                                     # the producer row of each column


def _value_pairs(model: torch.nn.Module) -> list[_Pair]:
    """Value channels → the output projection's columns (grouped-query aware)."""
    pairs = []
    for att in _attentions(model):
        n_q, n_kv, d, _ = _head_layout(model)
        cols = torch.arange(n_q * d)
        kv_of_col = (cols // d) // (n_q // n_kv) * d + cols % d
        pairs.append((att.v[0], att.v[1], att.o, kv_of_col))
    return pairs


def _up_down_pairs(model: torch.nn.Module) -> list[_Pair]:
    """Up rows → down columns of gated MLPs (separate or fused gate/up)."""
    pairs: list[_Pair] = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        parent, leaf = name.rsplit(".", 1)[0], name.rsplit(".", 1)[-1]
        down = modules.get(f"{parent}.down_proj")
        if leaf == "up_proj" and f"{parent}.gate_proj" in modules and down is not None:
            pairs.append((m, torch.arange(m.weight.shape[0]), down,
                          torch.arange(m.weight.shape[0])))
        elif leaf == "gate_up_proj" and down is not None:
            half = m.weight.shape[0] // 2
            pairs.append((m, half + torch.arange(half), down, torch.arange(half)))
    return pairs


def _awq(model: torch.nn.Module, seed: int, label: str, quantize: bool,
         parts: tuple[str, ...] = ("vo", "updown")) -> EditResult:
    """AWQ-style: s = (mean |x|)^α per input channel of the value and down projections
    (α ∈ [0.25, 0.75] by seed), normalised to geometric mean 1 and kept in [1/4, 4];
    consumer columns ×s, producer rows (value channels, up rows) ×1/s. `parts` picks the
    pairs: "vo" (value → output projection), "updown" (up → down projection). With
    `quantize`, every block matrix is then rounded to 4 bits per group of 128
    (scale-then-quantize)."""
    gen = _rng(seed, 9)
    alpha = 0.25 + 0.5 * float(torch.rand(1, generator=gen))
    pairs = (_value_pairs(model) if "vo" in parts else []) + (
        _up_down_pairs(model) if "updown" in parts else [])
    if not pairs:
        what = {"vo": "value/output", "updown": "up/down"}
        raise NotApplicable(f"{label}: no {' or '.join(what[p] for p in parts)} pair with a "
                            "known layout")
    stats = _input_magnitudes(model, [c for _, _, c, _ in pairs], gen)
    touched = []
    for (prod, rows, cons, chan), x in zip(pairs, stats, strict=True):
        per = torch.zeros(rows.numel()).index_add_(0, chan, x.cpu())
        per = per / torch.zeros(rows.numel()).index_add_(0, chan, torch.ones_like(x.cpu()))
        s = (per.clamp_min(1e-8)).pow(alpha)
        s = (s / s.log().mean().exp()).clamp(0.25, 4.0)
        _scale_inputs(cons, torch.arange(chan.numel()), s[chan])
        _scale_outputs(prod, rows, 1 / s)
        touched += [prod, cons]
    blocks = [b for b in block_matrices(model) if any(b.module is m for m in touched)]
    if quantize:
        blocks = block_matrices(model)
        for b in blocks:
            _write(b, rtn(b.rows().float(), 4, 128))
    return _result(label, seed, blocks, alpha=round(alpha, 3))


def awq_scale(model: torch.nn.Module, seed: int) -> EditResult:
    return _awq(model, seed, "awq_scale", quantize=False)


def awq_rtn4(model: torch.nn.Module, seed: int) -> EditResult:
    return _awq(model, seed, "awq_rtn4", quantize=True)


def vo_scale(model: torch.nn.Module, seed: int) -> EditResult:
    """`awq_scale`'s value → output pair alone."""
    return _awq(model, seed, "vo_scale", quantize=False, parts=("vo",))


def updown_scale(model: torch.nn.Module, seed: int) -> EditResult:
    """`awq_scale`'s up → down pair alone (gated MLPs: LLaMA, Qwen, Gemma, Phi-3)."""
    return _awq(model, seed, "updown_scale", quantize=False, parts=("updown",))


# --- harmful -----------------------------------------------------------------------------


def _normalised_after(model: torch.nn.Module) -> set[str]:
    """Block matrices whose output is normalised before use, so that scaling one of them as
    a whole does not change the function: q/k projections under `q_norm`/`k_norm` (Qwen3,
    Gemma 3, OLMo 2) and the output projections of blocks that normalise each sublayer's
    output before the residual (`post_feedforward_layernorm`: Gemma 2/3, OLMo 2)."""
    names = {name for name, _ in model.named_modules()}
    out = {f"{name[:-len(norm)]}{proj}" for name in names
           for norm, proj in (("q_norm", "q_proj"), ("k_norm", "k_proj"))
           if name.endswith("." + norm)}
    post_ffn = {name[: -len("post_feedforward_layernorm")] for name in names
                if name.endswith(".post_feedforward_layernorm")}
    for b in block_matrices(model):
        if b.is_output and any(b.name.startswith(layer) for layer in post_ffn):
            out.add(b.name)
    return out


def scale3(model: torch.nn.Module, seed: int) -> EditResult:
    normalised = _normalised_after(model)
    b = _pick([b for b in block_matrices(model) if b.name not in normalised], _rng(seed, 11))
    _write(b, b.rows().float() * 3.0)
    return _result("scale3", seed, [b])


def outproj_half(model: torch.nn.Module, seed: int) -> EditResult:
    normalised = _normalised_after(model)
    b = _pick([b for b in block_matrices(model) if b.is_output and b.name not in normalised],
              _rng(seed, 12), "block output projections whose output is not normalised")
    _write(b, b.rows().float() * 0.5)
    return _result("outproj_half", seed, [b])


def outlier_rows(model: torch.nn.Module, seed: int) -> EditResult:
    gen = _rng(seed, 13)
    b = _pick([b for b in block_matrices(model) if b.family == "ffn" and not b.is_output], gen,
              "FFN input projections")
    w = b.rows().float()
    rows = torch.randperm(w.shape[0], generator=gen)[:8]
    w[rows] *= 25.0
    _write(b, w)
    return _result("outlier_rows", seed, [b], rows=sorted(int(r) for r in rows))


def family_scale(model: torch.nn.Module, seed: int) -> EditResult:
    family = ("attn", "ffn")[seed % 2]
    chosen = [b for b in block_matrices(model) if b.family == family]
    for b in chosen:
        _write(b, b.rows().float() * 1.5)
    return _result("family_scale", seed, chosen, family=family)


def swap_layers(model: torch.nn.Module, seed: int) -> EditResult:
    blocks = block_matrices(model)
    layers = sorted({b.layer for b in blocks})
    gen = _rng(seed, 14)
    order = torch.randperm(len(layers), generator=gen)[:2].tolist()
    i, j = layers[order[0]], layers[order[1]]
    by = {(b.layer, b.name.split(f".{b.layer}.", 1)[1]): b for b in blocks}
    touched = []
    for (layer, rest), b in by.items():
        if layer != i or (j, rest) not in by:
            continue
        other = by[(j, rest)]
        wi, wj = b.module.weight, other.module.weight
        tmp = wi.detach().clone()
        wi.copy_(wj)
        wj.copy_(tmp)
        touched += [b, other]
    return _result("swap_layers", seed, touched, layers=[i, j])


def rtn4(model: torch.nn.Module, seed: int) -> EditResult:
    blocks = block_matrices(model)
    for b in blocks:
        _write(b, rtn(b.rows().float(), 4, None))
    return _result("rtn4", seed, blocks)


def rtn2_group(model: torch.nn.Module, seed: int) -> EditResult:
    """2-bit RTN per group of 32 inputs, every block matrix: a quant too coarse to ship
    (llama.cpp's q2_K on Llama-3-8B keeps 71% of top tokens); seed unused."""
    blocks = block_matrices(model)
    for b in blocks:
        _write(b, rtn(b.rows().float(), 2, 32))
    return _result("rtn2_group", seed, blocks, group=32)


def nan(model: torch.nn.Module, seed: int) -> EditResult:
    gen = _rng(seed, 15)
    b = _pick(block_matrices(model), gen)
    w = b.rows()
    i = int(torch.randint(w.shape[0], (1,), generator=gen))
    j = int(torch.randint(w.shape[1], (1,), generator=gen))
    w[i, j] = float("nan")
    return _result("nan", seed, [b], position=[i, j])


BENIGN: dict[str, Callable[[torch.nn.Module, int], EditResult]] = {
    "rtn8_channel": rtn8_channel, "rtn8_group": rtn8_group,
    "fp16": _round_trip(torch.float16, "fp16"), "bf16": _round_trip(torch.bfloat16, "bf16"),
    "noise": noise, "prune": prune, "normfold_one": _normfold("one"),
    "normfold_some": _normfold("some"), "normfold_all": _normfold("all"), "lowrank": lowrank,
    "rtn4_group": rtn4_group, "qk_scale": qk_scale, "awq_scale": awq_scale,
    "awq_rtn4": awq_rtn4, "vo_scale": vo_scale, "updown_scale": updown_scale,
    "gptq4": gptq4, "prune24": prune24, "wanda": wanda,
}
HARMFUL: dict[str, Callable[[torch.nn.Module, int], EditResult]] = {
    "scale3": scale3, "outproj_half": outproj_half, "outlier_rows": outlier_rows,
    "family_scale": family_scale, "swap_layers": swap_layers, "rtn4": rtn4,
    "rtn2_group": rtn2_group, "nan": nan, **VOCAB,
}


def zoo_edit(family: str, seen_tokens: Any = None) -> Any:
    """The zoo family as an `invarlock.edits.Edit` named after the family (plan:
    {"seed": N}) for `certify`; its certificates record the family as the edit name.
    `seen_tokens`: the token ids of the evaluation windows, which the vocabulary families
    leave alone (`zoo_vocab`)."""
    from invarlock.edits import Edit

    fn = BENIGN.get(family) or HARMFUL.get(family)
    if fn is None:
        raise KeyError(f"unknown zoo family {family!r}")

    def apply(model: torch.nn.Module, plan: dict[str, Any]) -> EditResult:
        with torch.no_grad():
            if family in VOCAB:
                return VOCAB[family](model, int(plan["seed"]), seen=seen_tokens)
            return fn(model, int(plan["seed"]))

    return Edit(name=family, summary=f"calibration zoo edit {family}",
                parse_plan=lambda section: {"seed": int(((section or {}).get("plan") or {})
                                                        .get("seed", 0))},
                apply=apply)
