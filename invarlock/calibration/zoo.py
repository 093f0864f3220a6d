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
  prune          magnitude pruning per matrix at 10% sparsity (seed 0, the top of the range, so
                 the reference runs hold the family's largest benign change) or a sparsity
                 drawn in 2–10% (other seeds)
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
  sign_flip      function-preserving negative scales: each value → output, up → down and q/k
                 class (per key head and rotary pair) flipped in sign on both sides with
                 probability ½ (normfold_*, qk_scale, the AWQ-style scales and sign_flip:
                 `zoo_rescale`)
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

from collections.abc import Callable
from typing import Any

import torch

from invarlock.calibration.zoo_base import (
    _ATTN_IN,
    CalibrationText,
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
from invarlock.calibration.zoo_rescale import (
    awq_rtn4,
    awq_scale,
    normfold,
    qk_scale,
    sign_flip,
    updown_scale,
    vo_scale,
)
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


PRUNE_SPARSITY = (0.02, 0.10)   # the family's range; seed 0 is its top


def prune(model: torch.nn.Module, seed: int) -> EditResult:
    low, high = PRUNE_SPARSITY
    sparsity = high if seed == 0 else low + (high - low) * float(
        torch.rand(1, generator=_rng(seed, 4)))
    blocks = block_matrices(model)
    for b in blocks:
        w = b.rows().float()
        k = int(sparsity * w.numel())
        if k:
            cut = w.abs().flatten().kthvalue(k).values
            _write(b, torch.where(w.abs() <= cut, torch.zeros_like(w), w))
    return _result("prune", seed, blocks, sparsity=round(sparsity, 4))


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
    "noise": noise, "prune": prune, "normfold_one": normfold("one"),
    "normfold_some": normfold("some"), "normfold_all": normfold("all"), "lowrank": lowrank,
    "rtn4_group": rtn4_group, "qk_scale": qk_scale, "awq_scale": awq_scale,
    "awq_rtn4": awq_rtn4, "vo_scale": vo_scale, "updown_scale": updown_scale,
    "sign_flip": sign_flip, "gptq4": gptq4, "prune24": prune24, "wanda": wanda,
}
HARMFUL: dict[str, Callable[[torch.nn.Module, int], EditResult]] = {
    "scale3": scale3, "outproj_half": outproj_half, "outlier_rows": outlier_rows,
    "family_scale": family_scale, "swap_layers": swap_layers, "rtn4": rtn4,
    "rtn2_group": rtn2_group, "nan": nan, **VOCAB,
}


# Families that size their edit from activations on calibration inputs.
DATA_AWARE = ("gptq4", "wanda", "awq_scale", "awq_rtn4", "vo_scale", "updown_scale")


def zoo_edit(family: str, seen_tokens: Any = None,
             calibration_text: CalibrationText | None = None) -> Any:
    """The zoo family as an `invarlock.edits.Edit` named after the family (plan:
    {"seed": N}) for `certify`; its certificates record the family as the edit name.
    `seen_tokens`: the token ids of the evaluation windows, which the vocabulary families
    leave alone (`zoo_vocab`). `calibration_text`: held-out windows the `DATA_AWARE`
    families calibrate on instead of seeded random tokens."""
    from invarlock.edits import Edit

    fn = BENIGN.get(family) or HARMFUL.get(family)
    if fn is None:
        raise KeyError(f"unknown zoo family {family!r}")

    def apply(model: torch.nn.Module, plan: dict[str, Any]) -> EditResult:
        with torch.no_grad():
            if family in VOCAB:
                return VOCAB[family](model, int(plan["seed"]), seen=seen_tokens)
            if family in DATA_AWARE:
                return fn(model, int(plan["seed"]), text=calibration_text)
            return fn(model, int(plan["seed"]))

    return Edit(name=family, summary=f"calibration zoo edit {family}",
                parse_plan=lambda section: {"seed": int(((section or {}).get("plan") or {})
                                                        .get("seed", 0))},
                apply=apply)
