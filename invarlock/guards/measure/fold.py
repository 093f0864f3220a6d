"""The function-relevant form of a weight: per-channel scales folded in before σ is taken.

A transformer's function does not change under some per-channel rescalings of its weights:

- **norm fold**: a LayerNorm/RMSNorm multiplies its output channel i by γ_i before the
  linears it feeds, so (γ/s, W·diag(s)) computes what (γ, W) does. SmoothQuant and AWQ apply
  exactly this before quantizing. The function depends on W·diag(γ), so σ is taken of that
  (diag(γ)·W for GPT-2's Conv1D, whose weight is stored [in, out]).
- **balanced pairs**: where a producer's output channel c reaches a consumer only linearly
  (LLaMA's `v_proj` → attention mixing → `o_proj`, OPT's `v_proj` → `out_proj`; the gated
  MLP's `up_proj` → act(gate)·up → `down_proj`, the up half of Phi-3's fused `gate_up_proj`),
  (diag(t)·P, C·diag(1/t)) is the same function. Both are
  replaced by their *balanced* form: s_c = sqrt(‖C[:, cols(c)]‖ / ‖P[c, :]‖), P' = diag(s)·P,
  C' = C·diag(1/s). Any rescaling t gives the same P', C' (s becomes s/t), so the guard sees
  one representative of the whole equivalence class. With grouped-query attention one value
  channel feeds the `o_proj` columns of every query head in its group.

Which norm feeds which linear is found by tracing one forward pass of a few tokens: a linear
whose input tensor *is* a norm's output is fed by that norm, whatever the architecture calls
its modules. Tied weights (an `lm_head` that is the embedding) are not folded: the rescaling
would change the embedding's other use. Balanced pairs are recognised by name (the pairs
above); other per-channel equivalences (through GELU, or across heads) do not preserve the
function and are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

# RMSNorms that scale by (1 + w) rather than w (Gemma family); others are found by a probe.
OFFSET_NORM_PREFIXES = ("Gemma",)
TRACE_TOKENS = 8
# (producer leaf, consumer leaf, sibling that must exist): channel rescalings that cancel.
BALANCED_PAIRS = (("v_proj", "o_proj", None), ("up_proj", "down_proj", "gate_proj"),
                  ("w3", "w2", "w1"), ("v_proj", "out_proj", None))
# (fused producer leaf, consumer leaf): the producer's second half of rows is the linear
# path (Phi-3's gate_up_proj = [gate; up], act(gate)·up → down_proj).
FUSED_BALANCED_PAIRS = (("gate_up_proj", "down_proj"),)


def _is_linear(module: Any) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _is_norm(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor)
            and weight.dim() == 1)


def _shared_weights(model: torch.nn.Module) -> set[str]:
    """Parameter names whose tensor is used under another name too (tied weights)."""
    by_ptr: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.data_ptr(), []).append(name)
    return {n for names in by_ptr.values() if len(names) > 1 for n in names}


def trace_norm_inputs(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{linear weight name: {"norm": norm weight name, "offset": 0|1, "transposed": bool}}
    for every linear whose input is a norm's output in one forward pass."""
    norms = {name: m for name, m in model.named_modules() if _is_norm(m)}
    linears = {name: m for name, m in model.named_modules() if _is_linear(m)}
    if not norms or not linears:
        return {}
    outputs: list[tuple[torch.Tensor, str]] = []  # kept alive: addresses are not reused
    fed: dict[str, str] = {}
    handles = []

    def norm_hook(name: str) -> Callable[..., None]:
        def hook(_m: Any, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outputs.append((out, name))
        return hook

    def linear_hook(name: str) -> Callable[..., None]:
        def hook(_m: Any, args: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or name in fed:
                return
            for out, norm in reversed(outputs):
                if out.data_ptr() == x.data_ptr() and out.numel() == x.numel():
                    fed[name] = norm
                    return
        return hook

    for name, m in norms.items():
        handles.append(m.register_forward_hook(norm_hook(name)))
    for name, m in linears.items():
        handles.append(m.register_forward_pre_hook(linear_hook(name)))
    try:
        device = next(model.parameters()).device
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
        ids = (torch.arange(TRACE_TOKENS, device=device) % max(vocab - 1, 1) + 1)[None, :]
        with torch.inference_mode():
            model(input_ids=ids)
    except Exception as exc:
        log.warning("spectral: could not trace which norm feeds which linear (%s); "
                    "weights are compared without folding", exc)
        return {}
    finally:
        for h in handles:
            h.remove()
    shared = _shared_weights(model)
    plan = {}
    for lin, norm in fed.items():
        weight = f"{lin}.weight"
        if weight in shared:
            continue
        offset = _scale_offset(norms[norm])
        plan[weight] = {"norm": f"{norm}.weight", "offset": offset,
                        "transposed": type(linears[lin]).__name__ == "Conv1D"}
    return plan


def _scale_offset(norm: torch.nn.Module) -> float:
    """1.0 when the norm scales by (1 + γ), else 0.0. Gemma's RMSNorms by name; any other
    (Nemotron's LayerNorm1P, Qwen3-Next, VaultGemma) by a probe: with γ and β zero, a plain
    norm outputs zeros and an offset one its normalised input. Parameters are swapped
    functionally, the module is not written to."""
    if type(norm).__name__.startswith(OFFSET_NORM_PREFIXES):
        return 1.0
    params = dict(norm.named_parameters(recurse=False))
    weight = params.get("weight")
    if weight is None or weight.device.type == "meta" or getattr(norm, "_hf_hook", None):
        return 0.0
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    x = torch.linspace(-1.0, 2.0, weight.shape[-1], device=weight.device, dtype=weight.dtype)
    try:
        with torch.inference_mode():
            out = torch.func.functional_call(norm, zeros, (x[None, None, :],))
    except Exception:  # a norm that cannot run alone keeps the plain form
        return 0.0
    return 1.0 if isinstance(out, torch.Tensor) and bool(out.abs().amax() > 0) else 0.0


def balanced_pairs(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{weight name: {"partner": weight name, "role": "producer"|"consumer", "group": g,
    "head_dim": d}} for the function-preserving producer → consumer pairs of the model."""
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    out: dict[str, dict[str, Any]] = {}
    for name, module in modules.items():
        for prod, cons, sibling in BALANCED_PAIRS:
            if not (name.endswith("." + prod) and isinstance(module, torch.nn.Linear)):
                continue
            parent = name[: -len(prod) - 1]
            partner = _sibling(modules, parent, cons)
            if partner is None or (sibling and _sibling(modules, parent, sibling) is None):
                continue
            p_out, c_in = module.weight.shape[0], modules[partner].weight.shape[1]
            if c_in % p_out:
                continue
            group = c_in // p_out
            head_dim = _head_dim(config) if group > 1 else p_out
            if head_dim is None or p_out % head_dim:
                continue
            info = {"group": group, "head_dim": head_dim}
            out[f"{name}.weight"] = {"partner": f"{partner}.weight", "role": "producer", **info}
            out[f"{partner}.weight"] = {"partner": f"{name}.weight", "role": "consumer", **info}
        for prod, cons in FUSED_BALANCED_PAIRS:
            if not (name.endswith("." + prod) and isinstance(module, torch.nn.Linear)):
                continue
            partner = _sibling(modules, name[: -len(prod) - 1], cons)
            half = module.weight.shape[0] // 2
            if partner is None or module.weight.shape[0] % 2 or \
                    modules[partner].weight.shape[1] != half:
                continue
            info = {"group": 1, "head_dim": half, "rows": [half, 2 * half]}
            out[f"{name}.weight"] = {"partner": f"{partner}.weight", "role": "producer", **info}
            out[f"{partner}.weight"] = {"partner": f"{name}.weight", "role": "consumer", **info}
    return out


def _sibling(modules: Mapping[str, Any], parent: str, leaf: str) -> str | None:
    """The Linear named `leaf` in the same parent module, if any."""
    name = f"{parent}.{leaf}"
    if name in modules and isinstance(modules[name], torch.nn.Linear):
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


def transform_plan(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Everything `effective` needs per weight name (norm fold and balanced pair)."""
    plan: dict[str, dict[str, Any]] = {}
    for name, entry in trace_norm_inputs(model).items():
        plan.setdefault(name, {})["fold"] = entry
    for name, entry in balanced_pairs(model).items():
        plan.setdefault(name, {})["balance"] = entry
    return plan


def folded(name: str, get: Callable[[str], torch.Tensor],
           plan: Mapping[str, Any]) -> torch.Tensor:
    """The float32 weight with its feeding norm's scale folded in ([out, in] as stored)."""
    w = get(name).to(torch.float32)
    fold = (plan.get(name) or {}).get("fold")
    if fold is None:
        return w
    gamma = get(fold["norm"]).to(device=w.device, dtype=torch.float32) + float(fold["offset"])
    return gamma[:, None] * w if fold["transposed"] else w * gamma[None, :]


def _channel_index(c_in: int, group: int, head_dim: int) -> torch.Tensor:
    """For each consumer column, the producer channel it reads (grouped-query attention:
    query head h uses key/value head h // group)."""
    col = torch.arange(c_in)
    return (col // head_dim) // group * head_dim + col % head_dim


def effective(name: str, get: Callable[[str], torch.Tensor],
              plan: Mapping[str, Any]) -> torch.Tensor:
    """The matrix whose σ the spectral guard compares: folded, then balanced with its pair."""
    w = folded(name, get, plan)
    bal = (plan.get(name) or {}).get("balance")
    if bal is None:
        return w
    other = folded(bal["partner"], get, plan).to(w.device)
    producer, consumer = (w, other) if bal["role"] == "producer" else (other, w)
    rows = bal.get("rows")  # a fused producer: only these rows feed the consumer linearly
    linear = producer if rows is None else producer[int(rows[0]):int(rows[1])]
    index = _channel_index(consumer.shape[1], int(bal["group"]), int(bal["head_dim"]))
    index = index.to(consumer.device)
    p_norm = linear.square().sum(dim=1)                                     # [p_out]
    c_norm = torch.zeros_like(p_norm).index_add_(0, index, consumer.square().sum(dim=0))
    ok = (p_norm > 0) & (c_norm > 0)
    s = torch.ones_like(p_norm)
    s[ok] = (c_norm[ok] / p_norm[ok]).pow(0.25)  # sqrt of the ratio of norms
    if bal["role"] == "producer":
        if rows is None:
            return producer * s[:, None]
        out = producer.clone()
        out[int(rows[0]):int(rows[1])] = linear * s[:, None]
        return out
    return consumer / s[index][None, :]

