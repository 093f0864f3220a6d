"""Which weights form function-preserving pairs, found by module names and sized from the
config: v→o per value channel, up→down per channel, q/k per key head and rotary pair, the
value channels and q/k of fused q/k/v projections (`invarlock.guards.measure.fold` says why
each pair preserves the function and how it is balanced). A relation {"a": side, "b": side}
means: scaling side a's channel class k by t and side b's by 1/t leaves the function
unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# (producer leaf, consumer leaf, sibling that must exist): channel rescalings that cancel.
BALANCED_PAIRS = (("v_proj", "o_proj", None), ("up_proj", "down_proj", "gate_proj"),
                  ("w3", "w2", "w1"), ("v_proj", "out_proj", None))
# (fused producer leaf, consumer leaf): the producer's second half of rows is the linear
# path (Phi-3's gate_up_proj = [gate; up], act(gate)·up → down_proj).
FUSED_BALANCED_PAIRS = (("gate_up_proj", "down_proj"),)
# fused q/k/v projection leaf → (the consumer of its value channels, model types whose
# layout is known; empty: any): GPT-2 [q; k; v] columns, Phi-3 [q; k; v] rows, GPT-NeoX
# per head [q; k; v] rows (Falcon's `query_key_value` has other layouts: left alone).
FUSED_QKV = {"c_attn": ("c_proj", ()), "qkv_proj": ("o_proj", ()),
             "query_key_value": ("dense", ("gpt_neox",))}
# per-head norms of q and k (Qwen3, Gemma 3, OLMo 2): a q/k scale no longer cancels
QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
# config keys that mean a rotary position embedding
ROPE_KEYS = ("rope_theta", "rotary_emb_base", "rotary_pct", "partial_rotary_factor",
             "rope_scaling")


def is_linear(module: Any) -> bool:
    """A Linear, or GPT-2's Conv1D (its weight stored [in, out])."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def balanced_pairs(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{weight name: {"partner": weight name(s), "relations": [relation, ...]}} for every
    weight in a function-preserving pair of the model (`pair_relations`)."""
    out: dict[str, dict[str, Any]] = {}
    for rel in pair_relations(model):
        a, b = rel["a"]["weight"], rel["b"]["weight"]
        for mine, other in ((a, b), (b, a)):
            entry = out.setdefault(mine, {"partners": [], "relations": []})
            if other != mine and other not in entry["partners"]:
                entry["partners"].append(other)
            if not any(r is rel for r in entry["relations"]):  # fused q/k: one weight
                entry["relations"].append(rel)
    return {name: {"partner": ", ".join(e["partners"]) or name, "relations": e["relations"]}
            for name, e in out.items()}


def _side(weight: str, axis: int, count: int, *, offset: int = 0, block: int | None = None,
          step: int = 0, head_dim: int | None = None, group: int = 1, rotary: int = 0,
          interleaved: bool = False) -> dict[str, Any]:
    """One side of a pair: `count` channels of `weight` along `axis` (as stored), channel c
    at index offset + (c // block)·step + c % block; c belongs to head c // head_dim, whose
    key/value head is head // group, and to the rotary class of c % head_dim."""
    return {"weight": weight, "axis": axis, "count": count, "offset": offset,
            "block": block or count, "step": step, "head_dim": head_dim or count,
            "group": group, "rotary": rotary, "interleaved": interleaved}


def pair_relations(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Every function-preserving pair of the model, by name: q/k per key head and rotary
    pair, v→o per value channel, up→down per channel (see the module docstring).

    A relation {"a": side, "b": side} means: scaling side a's channel k by t and side b's
    by 1/t leaves the function unchanged."""
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    heads = _heads(config)
    rotary, interleaved = _rotary(config, heads[2] if heads else None)
    out: list[dict[str, Any]] = []
    for name, module in modules.items():
        if not is_linear(module):
            continue
        leaf, parent = name.rsplit(".", 1)[-1], name.rsplit(".", 1)[0]
        for prod, cons, sibling in BALANCED_PAIRS:
            partner = _sibling(modules, parent, cons)
            if leaf != prod or partner is None or (
                    sibling and _sibling(modules, parent, sibling) is None):
                continue
            p_out, c_in = _out_in(module), _in(modules[partner])
            if not isinstance(module, torch.nn.Linear) or c_in % p_out:
                continue
            group = c_in // p_out
            if group > 1 and heads is None:
                continue
            head_dim = heads[2] if heads and group > 1 else p_out
            if p_out % head_dim:
                continue
            out.append({"a": _side(f"{name}.weight", 0, p_out),
                        "b": _side(f"{partner}.weight", 1, c_in, head_dim=head_dim,
                                   group=group)})
        for prod, cons in FUSED_BALANCED_PAIRS:
            partner = _sibling(modules, parent, cons)
            if leaf != prod or partner is None:
                continue
            half = module.weight.shape[0] // 2
            if module.weight.shape[0] % 2 or _in(modules[partner]) != half:
                continue
            out.append({"a": _side(f"{name}.weight", 0, half, offset=half),
                        "b": _side(f"{partner}.weight", 1, half)})
        if heads is not None:
            out += _attention_relations(modules, name, leaf, parent, heads, rotary,
                                        interleaved, str(getattr(config, "model_type", "")))
    return out


def _attention_relations(modules: Mapping[str, Any], name: str, leaf: str, parent: str,
                         heads: tuple[int, int, int], rotary: int, interleaved: bool,
                         model_type: str) -> list[dict[str, Any]]:
    """q/k and v→o relations of one attention projection (separate or fused q/k/v)."""
    n_q, n_kv, d = heads
    group = n_q // n_kv
    rot = {"rotary": rotary, "interleaved": interleaved, "head_dim": d}
    normalised = any(f"{parent}.{n}" in modules for n in QK_NORMS)
    out = []
    weight = f"{name}.weight"
    if leaf == "q_proj" and not normalised:
        k = _sibling(modules, parent, "k_proj")
        if k and _out_in(modules[name]) == n_q * d and _out_in(modules[k]) == n_kv * d:
            out.append({"a": _side(weight, 0, n_q * d, group=group, **rot),
                        "b": _side(f"{k}.weight", 0, n_kv * d, **rot)})
        return out
    fused = FUSED_QKV.get(leaf)
    if fused is None or (fused[1] and model_type not in fused[1]):
        return out
    consumer = _sibling(modules, parent, fused[0])
    module = modules[name]
    conv = type(module).__name__ == "Conv1D"
    if consumer is None or _out_in(module) != (n_q + 2 * n_kv) * d or \
            _in(modules[consumer]) != n_q * d:
        return out
    axis = 1 if conv else 0
    if leaf == "query_key_value":  # GPT-NeoX: per head [q; k; v], n_q == n_kv
        if n_q != n_kv:
            return out
        q = _side(weight, axis, n_q * d, block=d, step=3 * d, **rot)
        k = _side(weight, axis, n_q * d, offset=d, block=d, step=3 * d, **rot)
        v = _side(weight, axis, n_q * d, offset=2 * d, block=d, step=3 * d)
    else:  # [q (n_q heads); k (n_kv); v (n_kv)]
        q = _side(weight, axis, n_q * d, group=group, **rot)
        k = _side(weight, axis, n_kv * d, offset=n_q * d, **rot)
        v = _side(weight, axis, n_kv * d, offset=(n_q + n_kv) * d)
    c_axis = 0 if type(modules[consumer]).__name__ == "Conv1D" else 1
    o = _side(f"{consumer}.weight", c_axis, n_q * d, head_dim=d, group=group)
    if not normalised:
        out.append({"a": q, "b": k})
    out.append({"a": v, "b": o})
    return out


def _out_in(module: Any) -> int:
    """Output features of a Linear ([out, in]) or Conv1D ([in, out])."""
    w = module.weight
    return int(w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0])


def _in(module: Any) -> int:
    w = module.weight
    return int(w.shape[0] if type(module).__name__ == "Conv1D" else w.shape[1])


def _heads(config: Any) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head dim) from the config, if it says."""
    n_q = getattr(config, "num_attention_heads", None)
    if not n_q:
        return None
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    head_dim = _head_dim(config)
    if head_dim is None or int(n_q) % int(n_kv):
        return None
    return int(n_q), int(n_kv), int(head_dim)


def _rotary(config: Any, head_dim: int | None) -> tuple[int, bool]:
    """(rotary dims per head, interleaved pairs) of the model's rotary embedding; (0, False)
    without one (absolute or ALiBi positions: any per-channel scale commutes)."""
    if head_dim is None:
        return 0, False
    rope = getattr(config, "rope_parameters", None) or {}
    if getattr(config, "rotary_dim", None):  # GPT-J, CodeGen: pairs (2i, 2i + 1)
        return int(config.rotary_dim), True
    if not rope and not any(getattr(config, k, None) for k in ROPE_KEYS):
        return 0, False
    factor = (rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None) or \
        getattr(config, "partial_rotary_factor", None) or \
        getattr(config, "rotary_pct", None) or 1.0
    return int(head_dim * float(factor)) // 2 * 2, False


def _sibling(modules: Mapping[str, Any], parent: str, leaf: str) -> str | None:
    """The Linear/Conv1D named `leaf` in the same parent module, if any."""
    name = f"{parent}.{leaf}"
    if name in modules and is_linear(modules[name]):
        return name
    return None


def _head_dim(config: Any) -> int | None:
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden, heads = getattr(config, "hidden_size", None), getattr(
        config, "num_attention_heads", None)
    return int(hidden) // int(heads) if hidden and heads else None
