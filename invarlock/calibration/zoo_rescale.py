"""Function-preserving rescalings of the edit zoo: scales moved between two weights so that
the model computes the same function (up to rounding) while every touched matrix changes.
Norm folds (per-channel s between a norm and the linears it feeds, SmoothQuant/AWQ), q/k
scales (SmoothAttention: query ×λ, key ×1/λ), AWQ-style activation-aware scales on the
value → output and up → down pairs, alone or followed by 4-bit rounding (`awq_rtn4`), and
sign flips of those pairs' channels (`sign_flip`: a negative scale)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from invarlock.calibration.zoo_base import (
    _BLOCK,
    _FFN_NORMS,
    _NORM_FEEDS,
    Block,
    CalibrationText,
    NotApplicable,
    _pick,
    _result,
    _rng,
    _write,
    block_matrices,
    calibration_ids,
    calibration_record,
    forward_batches,
    rtn,
)
from invarlock.edits.result import EditResult


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


def normfold(fraction: str) -> Callable[[torch.nn.Module, int], EditResult]:
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
    return lam[:, _rotary_classes(d, rotary)]


def _rotary_classes(d: int, rotary: int) -> torch.Tensor:
    """The class of each head channel: its rotary pair (j, j + r/2), or itself beyond r."""
    j = torch.arange(d)
    return torch.where(j < rotary, j % max(rotary // 2, 1), rotary // 2 + j - rotary)


def _signs(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """±1, each −1 with probability ½."""
    return torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0)


def sign_flip(model: torch.nn.Module, seed: int) -> EditResult:
    """Function-preserving negative scales: each value channel (on v and on the output
    projection's columns that read it), each up/down channel, and each q/k class (per key
    head and rotary pair; not under q/k norms) flipped in sign on both sides with
    probability ½. No norm of either side sees a sign; only the pair does."""
    gen = _rng(seed, 10)
    touched = []
    for prod, rows, cons, chan in _value_pairs(model) + _up_down_pairs(model):
        t = _signs(gen, rows.numel())
        _scale_inputs(cons, torch.arange(chan.numel()), t[chan])
        _scale_outputs(prod, rows, t)
        touched += [prod, cons]
    attentions = _attentions(model)
    if attentions:
        n_q, n_kv, d, rotary = _head_layout(model)
        for att in attentions:
            if att.qk_norms is not None:
                continue
            t = _signs(gen, n_kv, d - rotary // 2)[:, _rotary_classes(d, rotary)]  # [n_kv, d]
            _scale_outputs(att.q[0], att.q[1], t.repeat_interleave(n_q // n_kv, dim=0).flatten())
            _scale_outputs(att.k[0], att.k[1], t.flatten())
            touched += [att.q[0], att.k[0]]
    if not touched:
        raise NotApplicable("sign_flip: no value/output, up/down or q/k pair with a known layout")
    blocks = [b for b in block_matrices(model) if any(b.module is m for m in touched)]
    return _result("sign_flip", seed, blocks)


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


AWQ_SEQUENCES, AWQ_LENGTH = 2, 32  # the random-token inputs of the AWQ-style families


def _input_magnitudes(model: torch.nn.Module, modules: list[Any],
                      ids: torch.Tensor) -> list[torch.Tensor]:
    """Mean |x| per input channel of each module over the calibration ids
    (`calibration_ids`: seeded random tokens, or held-out text): the activation statistics
    AWQ sizes its scales from."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    handles = []
    for m in modules:
        def hook(mod: Any, args: Any, key: int = id(m)) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            part = x.abs().double().sum(dim=0)
            sums[key] = sums[key] + part if key in sums else part
            counts[key] = counts.get(key, 0) + x.shape[0]
        handles.append(m.register_forward_pre_hook(hook))
    try:
        forward_batches(model, ids)
    finally:
        for h in handles:
            h.remove()
    return [(sums[id(m)] / counts[id(m)]).float() for m in modules]


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
         parts: tuple[str, ...] = ("vo", "updown"), text: CalibrationText | None = None
         ) -> EditResult:
    """AWQ-style: s = (mean |x|)^α per input channel of the value and down projections
    (α ∈ [0.25, 0.75] by seed), normalised to geometric mean 1 and kept in [1/4, 4];
    consumer columns ×s, producer rows (value channels, up rows) ×1/s. `parts` picks the
    pairs: "vo" (value → output projection), "updown" (up → down projection). With
    `quantize`, every block matrix is then rounded to 4 bits per group of 128
    (scale-then-quantize). The activations come from `text` when given."""
    gen = _rng(seed, 9)
    alpha = 0.25 + 0.5 * float(torch.rand(1, generator=gen))
    pairs = (_value_pairs(model) if "vo" in parts else []) + (
        _up_down_pairs(model) if "updown" in parts else [])
    if not pairs:
        what = {"vo": "value/output", "updown": "up/down"}
        raise NotApplicable(f"{label}: no {' or '.join(what[p] for p in parts)} pair with a "
                            "known layout")
    ids = calibration_ids(model, gen, text, AWQ_SEQUENCES, AWQ_LENGTH)
    stats = _input_magnitudes(model, [c for _, _, c, _ in pairs], ids)
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
    plan: dict[str, Any] = {"alpha": round(alpha, 3)}
    if text is not None:  # plans made without text stay as they were recorded
        plan.update(calibration_record(ids, text))
    return _result(label, seed, blocks, **plan)


def awq_scale(model: torch.nn.Module, seed: int, text: CalibrationText | None = None
              ) -> EditResult:
    return _awq(model, seed, "awq_scale", quantize=False, text=text)


def awq_rtn4(model: torch.nn.Module, seed: int, text: CalibrationText | None = None
             ) -> EditResult:
    return _awq(model, seed, "awq_rtn4", quantize=True, text=text)


def vo_scale(model: torch.nn.Module, seed: int, text: CalibrationText | None = None
             ) -> EditResult:
    """`awq_scale`'s value → output pair alone."""
    return _awq(model, seed, "vo_scale", quantize=False, parts=("vo",), text=text)


def updown_scale(model: torch.nn.Module, seed: int, text: CalibrationText | None = None
                 ) -> EditResult:
    """`awq_scale`'s up → down pair alone (gated MLPs: LLaMA, Qwen, Gemma, Phi-3)."""
    return _awq(model, seed, "updown_scale", quantize=False, parts=("updown",), text=text)
