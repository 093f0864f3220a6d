"""The function-relevant form of a weight: per-channel scales folded in before σ is taken.

A transformer's function does not change under some per-channel rescalings of its weights:

- **norm fold**: a LayerNorm/RMSNorm multiplies its output channel i by γ_i before the
  linears it feeds, so (γ/s, W·diag(s)) computes what (γ, W) does. SmoothQuant and AWQ apply
  exactly this before quantizing. The function depends on W·diag(γ), so σ is taken of that
  (diag(γ)·W for GPT-2's Conv1D, whose weight is stored [in, out]).
- **balanced pairs**: where a producer's output channel c reaches a consumer only linearly
  (LLaMA's `v_proj` → attention mixing → `o_proj`, OPT's `v_proj` → `out_proj`; the gated
  MLP's `up_proj` → act(gate)·up → `down_proj`, the up half of Phi-3's fused `gate_up_proj`;
  the value channels of fused q/k/v projections: GPT-2's `c_attn`, GPT-NeoX's
  `query_key_value`, Phi-3's `qkv_proj`), (diag(t)·P, C·diag(1/t)) is the same function.
  So is (diag(t)·W_q, diag(1/t)·W_k) when t is shared by every query head that reads one
  key head (grouped-query attention) and, under a rotary embedding, by both members of each
  rotary pair (RoPE rotates them together; SmoothAttention scales exactly so). Every pair is
  replaced by its *balanced* form: per channel class k, s_k = sqrt(‖b_k‖ / ‖a_k‖), a' = a·s,
  b' = b/s. Any rescaling t > 0 gives the same a', b' (s becomes s/t), so the guards see one
  representative of the whole equivalence class. A negative t (a sign flip of a class on
  both sides) preserves the function too, and no norm sees it: a subject compared with its
  baseline (`Reference`) has each class's sign aligned with the baseline's, by the sign of
  the two sides' summed cosines with the baseline's (+1 on any edit that keeps the channel).
  q/k under per-head norms (Qwen3's `q_norm`) are not paired: there the scale does not
  cancel.

Which norm feeds which linear is found by tracing one forward pass of a few tokens: a linear
whose input tensor *is* a norm's output is fed by that norm, whatever the architecture calls
its modules. Tied weights (an `lm_head` that is the embedding) are not folded: the rescaling
would change the embedding's other use. Balanced pairs are recognised by name (the pairs
above: `invarlock.guards.measure.pairs`) and sized from the config (heads, key/value heads,
head dim, rotary dims); other per-channel equivalences (through GELU, or across heads) do
not preserve the function and are left alone. `output_scales` gives the same balancing for
a producer's *outputs* (the RMT guard measures y·s, which no such rescaling changes).
"""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from invarlock.guards.measure.pairs import balanced_pairs, is_linear

log = logging.getLogger(__name__)

# {pair: balancing scale} of one model under one plan (`balancing_scale`)
Memo = dict[str, torch.Tensor]
FOLDING = "folded "  # memo key prefix: a folded matrix read for a pair's norms, not yet used
SIGN = "sign "  # memo key prefix: a pair's class signs against the reference
# RMSNorms that scale by (1 + w) rather than w (Gemma family); others are found by a probe.
OFFSET_NORM_PREFIXES = ("Gemma",)
TRACE_TOKENS = 8



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
    linears = {name: m for name, m in model.named_modules() if is_linear(m)}
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




def transform_plan(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Everything `effective` needs per weight name (norm fold and balanced pair).

    The plan depends on the model's structure only, so it is traced once per model object
    (each guard asks for it on the same baseline) and handed out as a copy."""
    try:
        traced = _plans.get(model)
    except TypeError:  # not weakly referable: trace every time
        return _trace_plan(model)
    if traced is None:
        traced = _plans[model] = _trace_plan(model)
    return copy.deepcopy(traced)


_plans: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = \
    weakref.WeakKeyDictionary()


def _trace_plan(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
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


def _channels(side: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(index along the axis, channel class, number of classes) of each of the side's
    channels. Classes: key/value head × (rotary pair or lone channel), so one scale per
    class is what RoPE commutes with (x_j and its partner rotate together). Shared between
    calls: read, never written."""
    return _channel_layout(*(int(side[k]) for k in ("count", "block", "step", "offset",
                                                     "head_dim", "rotary", "group")),
                           bool(side["interleaved"]))


@functools.lru_cache(maxsize=4096)
def _channel_layout(count: int, block: int, step: int, offset: int, d: int, r: int,
                    group: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    c = torch.arange(count)
    index = offset + (c // block) * step + c % block
    j = c % d
    if r and interleaved:
        cls = torch.where(j < r, j // 2, r // 2 + j - r)
    elif r:
        cls = torch.where(j < r, j % (r // 2), r // 2 + j - r)
    else:
        cls = j
    per_head = d - r // 2
    kv_head = (c // d) // group
    return index, kv_head * per_head + cls, int(kv_head.max()) * per_head + per_head


def _slice_norms(w: torch.Tensor, side: Mapping[str, Any]) -> torch.Tensor:
    """Σ of squares per channel class of one side."""
    return _class_sums(w, None, side)


def _class_sums(w: torch.Tensor, r: torch.Tensor | None,
                side: Mapping[str, Any]) -> torch.Tensor:
    """Σ w·r (r None: Σ w²) per channel class of one side."""
    index, cls, n = _channels(side)
    axis = int(side["axis"])
    cls = cls.to(w.device)

    def pick(x: torch.Tensor) -> torch.Tensor:
        if index.numel() == x.shape[axis] and bool(
                (index == torch.arange(index.numel())).all()):
            return x  # every channel in order: no copy
        return x.index_select(axis, index.to(x.device))

    picked = pick(w)
    products = picked.square() if r is None else picked * pick(r.to(w.device))
    sums = products.sum(dim=1 - axis)
    return torch.zeros(n, dtype=sums.dtype, device=w.device).index_add_(0, cls, sums)


@dataclass(frozen=True)
class Reference:
    """The model a subject's pairs are aligned to (its baseline): its weights by name and
    its memo. With `hand_over`, the reference's folded sides read for the signs are left
    waiting in its memo (`FOLDING`) for its own `effective` calls, which come next in a walk
    over both models: each weight is still read once."""

    get: Callable[[str], torch.Tensor]
    memo: Memo | None = None
    hand_over: bool = False


def _class_signs(rel: Mapping[str, Any], a: torch.Tensor, b: torch.Tensor,
                 norms: tuple[torch.Tensor, torch.Tensor], plan: Mapping[str, Any],
                 reference: Reference) -> torch.Tensor:
    """±1 per channel class: −1 where the subject's class (folded sides a, b, their squared
    class norms `norms`) points against the reference's, by the sum of the two sides'
    cosines with it. A sign flip on both sides (function-preserving) gives −2 and is undone;
    a flip of one side only gives about 0 and the remaining side still shows it."""
    ra, rb = _pair_sides(rel, reference.get, plan, reference.memo, wait=reference.hand_over)
    total = _class_cosines(a, ra, rel["a"], norms[0])
    total = total + _class_cosines(b, rb, rel["b"], norms[1]).to(total.device)
    return torch.where(total < 0, -1.0, 1.0).to(torch.float32)


def _class_cosines(w: torch.Tensor, r: torch.Tensor, side: Mapping[str, Any],
                   squared_norms: torch.Tensor) -> torch.Tensor:
    """Per channel class of one side, the cosine between w's and r's channels (w's squared
    class norms given); 0 where either is zero."""
    dots = _class_sums(w, r, side)
    scale = (squared_norms.to(w.device) * _class_sums(r.to(w.device), None, side)).sqrt()
    return torch.where(scale > 0, dots / scale.clamp_min(1e-30), torch.zeros_like(dots))


def balancing_scale(rel: Mapping[str, Any], get: Callable[[str], torch.Tensor],
                    plan: Mapping[str, Any], memo: Memo | None = None) -> torch.Tensor:
    """s per channel class: side a times s and side b over s have equal norms per class,
    s = (‖b_k‖ / ‖a_k‖)^½; any rescaling (a·t, b/t) turns s into s/t.

    With `memo` (one per model and plan), each pair's s is formed once: both sides of a pair
    need it, and forming it reads and folds both weights."""
    return _pair_stats(rel, get, plan, memo)[0]


def class_norm(rel: Mapping[str, Any], get: Callable[[str], torch.Tensor],
               plan: Mapping[str, Any], memo: Memo | None = None) -> torch.Tensor:
    """n per channel class: the norm both sides of the balanced pair have there,
    n_k = (‖a_k‖·‖b_k‖)^½, the same whatever rescaling the pair carries (0 where either
    side is zero). Formed with the pair's balancing scale, from the same reads."""
    return _pair_stats(rel, get, plan, memo)[1]


def signed_scale(rel: Mapping[str, Any], get: Callable[[str], torch.Tensor],
                 plan: Mapping[str, Any], memo: Memo | None = None,
                 reference: Reference | None = None) -> torch.Tensor:
    """`balancing_scale` times each class's sign against `reference` (None: the plain
    scale): the factor that takes a subject's pair to the reference's balanced form."""
    if reference is None:
        return balancing_scale(rel, get, plan, memo)
    s, _, sign = _pair_stats(rel, get, plan, memo, reference, with_sign=True)
    return s * sign.to(s.device)


def _pair_stats(rel: Mapping[str, Any], get: Callable[[str], torch.Tensor],
                plan: Mapping[str, Any], memo: Memo | None, reference: Reference | None = None,
                with_sign: bool = False) -> tuple[torch.Tensor, ...]:
    """(balancing scale s, class norm n) of a pair, from one read and fold of each side;
    with a `reference`, the class signs against it too (kept in the memo; with `with_sign`
    also returned)."""
    key = _pair_key(rel)
    if memo is not None and key in memo and "norm " + key in memo and (
            reference is None or SIGN + key in memo):
        return (memo[key], memo["norm " + key]) + ((memo[SIGN + key],) if with_sign else ())
    # inside `effective` of one side, the other side's fold waits for its own call (the
    # pair's sides come next to each other in a walk: one matrix held briefly)
    inside = memo is not None and any(FOLDING + rel[k]["weight"] in memo for k in ("a", "b"))
    a, b = _pair_sides(rel, get, plan, memo, wait=inside)
    na, nb = _slice_norms(a, rel["a"]), _slice_norms(b.to(a.device), rel["b"])
    if na.shape != nb.shape:
        raise ValueError(f"pair {rel['a']['weight']} / {rel['b']['weight']}: "
                         f"{na.numel()} vs {nb.numel()} channel classes")
    ok = (na > 0) & (nb > 0)
    s = torch.ones_like(na)
    s[ok] = (nb[ok] / na[ok]).pow(0.25)  # sqrt of the ratio of norms
    n = (na * nb).pow(0.25)
    sign = None if reference is None else _class_signs(rel, a, b.to(a.device), (na, nb),
                                                        plan, reference)
    if memo is not None:
        memo[key], memo["norm " + key] = s, n
        if sign is not None:
            memo[SIGN + key] = sign
    return (s, n) + ((sign,) if with_sign else ())


def data_factors(name: str, get: Callable[[str], torch.Tensor], plan: Mapping[str, Any],
                 axis: int, size: int, base_get: Callable[[str], torch.Tensor],
                 memo: Memo | None = None, base_memo: Memo | None = None
                 ) -> torch.Tensor | None:
    """Per index along `axis` of the subject's effective matrix `name` (None: no pair there),
    the factor that moves a pair's change of magnitude onto its side b: side a × n_b/n_s,
    side b × n_s/n_b per class (n: `class_norm`, of the baseline `base_get` and the subject
    `get`). The baseline's form is its balanced one (factors 1); a rescaling the pair absorbs
    leaves n, and so the factors, at 1. On v→o and up→down the magnitude then sits on the
    consumer, whose input energy says whether the channel is used: GPTQ's error pushed into
    a down_proj column the data never drives (balanced, half of it lands on up_proj's row)
    moves neither side's gain along the data. On q/k it sits on k: the logits' scale."""
    factors = None
    for rel in _relations(name, plan):
        for key, sign in (("a", -1), ("b", 1)):
            side = rel[key]
            if side["weight"] != name or int(side["axis"]) != axis:
                continue
            n = class_norm(rel, get, plan, memo)
            nb = class_norm(rel, base_get, plan, base_memo).to(n.device)
            ok = (n > 0) & (nb > 0)
            ratio = torch.ones_like(n)
            ratio[ok] = n[ok] / nb[ok]
            if factors is None:
                factors = torch.ones(size, dtype=torch.float32, device=n.device)
            index, factor = _multiplier(side, ratio, sign)
            factors[index.to(n.device)] *= factor.to(torch.float32)
    return factors


def _multiplier(side: Mapping[str, Any], s: torch.Tensor, sign: int) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """(indices along the side's axis, the factor each is multiplied by)."""
    index, cls, _ = _channels(side)
    return index, s[cls.to(s.device)].pow(sign)


def _pair_key(rel: Mapping[str, Any]) -> str:
    return repr([sorted(rel[k].items()) for k in ("a", "b")])


def is_plain(name: str, plan: Mapping[str, Any]) -> bool:
    """The effective matrix is the stored weight itself (no norm folded in, no pair)."""
    return (plan.get(name) or {}).get("fold") is None and not _relations(name, plan)


def _relations(name: str, plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(((plan.get(name) or {}).get("balance") or {}).get("relations") or [])


def effective(name: str, get: Callable[[str], torch.Tensor],
              plan: Mapping[str, Any], memo: Memo | None = None,
              reference: Reference | None = None) -> torch.Tensor:
    """The matrix whose σ the spectral guard compares: folded, then balanced in every pair
    it belongs to (the pairs touch disjoint channels, so their order does not matter); with
    a `reference`, each class's sign aligned with the reference's (`signed_scale`)."""
    w = _pending_fold(name, get, plan, memo)
    if memo is None or not _relations(name, plan):
        return _balance(name, w, get, plan, memo, reference)
    memo[FOLDING + name] = w  # the pair's norms are taken from it, not from a second read
    try:
        return _balance(name, w, get, plan, memo, reference)
    finally:
        memo.pop(FOLDING + name, None)


def _pair_sides(rel: Mapping[str, Any], get: Callable[[str], torch.Tensor],
                plan: Mapping[str, Any], memo: Memo | None, *, wait: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair's folded sides (a, b), taken from the memo where they wait, else read; with
    `wait`, left waiting in the memo again for their own `effective` calls."""
    names = (rel["a"]["weight"], rel["b"]["weight"])
    a = _pending_fold(names[0], get, plan, memo)
    b = a if names[1] == names[0] else _pending_fold(names[1], get, plan, memo)
    if wait and memo is not None:
        memo.update({FOLDING + n: w for n, w in zip(names, (a, b), strict=True)})
    return a, b


def _pending_fold(name: str, get: Callable[[str], torch.Tensor], plan: Mapping[str, Any],
                  memo: Memo | None) -> torch.Tensor:
    """`folded(name)`, taken (and dropped) from the memo where a pair's norms formed it."""
    if memo is not None and FOLDING + name in memo:
        return memo.pop(FOLDING + name)
    return folded(name, get, plan)


def balanced(name: str, get: Callable[[str], torch.Tensor],
             plan: Mapping[str, Any], memo: Memo | None = None) -> torch.Tensor:
    """The float32 weight balanced in every pair it belongs to, its norm's scale not folded
    in (the scales s are those of `effective`): what the norm's own channels multiply."""
    return _balance(name, get(name).to(torch.float32), get, plan, memo)


def _balance(name: str, w: torch.Tensor, get: Callable[[str], torch.Tensor],
             plan: Mapping[str, Any], memo: Memo | None,
             reference: Reference | None = None) -> torch.Tensor:
    if not _relations(name, plan):
        return w
    for axis in (0, 1):  # one product per axis (a channel is in at most one pair per axis)
        factors = _pair_factors(name, get, plan, axis, None, memo, int(w.shape[axis]),
                                reference)
        if factors is not None:
            shape = [1, 1]
            shape[axis] = -1
            w = w * factors.to(w.device).view(shape)
    return w


def _pair_factors(name: str, get: Callable[[str], torch.Tensor], plan: Mapping[str, Any],
                  axis: int, factors: torch.Tensor | None, memo: Memo | None,
                  size: int | None = None,
                  reference: Reference | None = None) -> torch.Tensor | None:
    """`factors` (None: ones) times the balancing scale (`signed_scale`: with its signs
    against `reference`) of every pair side of the weight `name` along `axis` (as stored;
    `size` long, read from the weight when not given): what `effective` multiplies that
    axis by. A sign is its own inverse: both sides are multiplied by it."""
    for rel in _relations(name, plan):
        s = None
        for key, sign in (("a", 1), ("b", -1)):
            side = rel[key]
            if side["weight"] != name or int(side["axis"]) != axis:
                continue
            if s is None:
                s = signed_scale(rel, get, plan, memo, reference)
            if factors is None:
                n = get(name).shape[axis] if size is None else size
                factors = torch.ones(n, dtype=torch.float32)
            factors = factors.to(s.device)
            index, factor = _multiplier(side, s, sign)
            factors[index.to(s.device)] *= factor
    return factors


def output_scales(name: str, get: Callable[[str], torch.Tensor], plan: Mapping[str, Any],
                  conv1d: bool = False, memo: Memo | None = None,
                  reference: Reference | None = None) -> torch.Tensor | None:
    """Per output feature of the linear `name` (a weight name), the factor that turns its
    output into that of its balanced form (None: no pair changes it; with a `reference`,
    signs aligned with it). Producer outputs times this factor are unchanged by every
    rescaling the pairs absorb."""
    return _pair_factors(name, get, plan, 1 if conv1d else 0, None, memo, None, reference)


def input_scales(name: str, get: Callable[[str], torch.Tensor], plan: Mapping[str, Any],
                 conv1d: bool = False, memo: Memo | None = None) -> torch.Tensor | None:
    """Per input feature of the linear `name` (a weight name), the factor `effective`
    multiplies that input by (the feeding norm's scale; the balancing scale of each pair
    whose consumer it is); None: no factor. The effective matrix applied to x / factor gives
    the stored weight's output on x, so the edit size along the data is taken on x / factor."""
    fold = (plan.get(name) or {}).get("fold")
    gamma = None if fold is None else (
        get(fold["norm"]).to(torch.float32) + float(fold["offset"]))
    return _pair_factors(name, get, plan, 0 if conv1d else 1, gamma, memo)
