"""Symmetric round-to-nearest (RTN) fake quantization as pure tensor functions.

A weight block is seen as [out, in]: one row per output channel. For a bit width b,
qmax = 2^(b-1) - 1 and, per channel, group or tensor,

    s = a / qmax,   q = clamp(round(w / s), -qmax, qmax),   ŵ = q · s     (round: half to even)

where a is max |w| or, with a clamp ratio p, the nearest-rank p-quantile of |w| (the
⌈p·n⌉-th smallest |w|, so the scale always comes from an actual weight and p = 1 is exactly
the absmax). Values beyond a clip to ±qmax·s. A group whose scale is zero stays zero.

Because the reference |w| maps to ±qmax and |w| → |ŵ| is monotone, the scale of ŵ equals the
scale of w (in float32, fl(fl(qmax·s)/qmax) = s for every significand, checked exhaustively), so
quantizing twice gives bit-identical weights (tested in float32, float16 and bfloat16).

Arithmetic is float32 on the weight's own device, in row chunks of bounded size; the result is
written back in the weight's dtype.
"""

from __future__ import annotations

import math

import torch

# Elements per float32 work chunk (16 MiB); temporaries stay a small multiple of this.
CHUNK_ELEMENTS = 1 << 22


def qmax(bitwidth: int) -> int:
    """Largest integer level of a symmetric signed b-bit code (the -2^(b-1) level is unused)."""
    if not 2 <= bitwidth <= 8:
        raise ValueError(f"bitwidth must be from 2 to 8, got {bitwidth}")
    return 2 ** (bitwidth - 1) - 1


def reference_magnitude(absw: torch.Tensor, clamp_ratio: float | None) -> torch.Tensor:
    """Per-slice magnitude a over the last dim of |w|: the max, or the nearest-rank quantile."""
    if clamp_ratio is None:
        return absw.amax(dim=-1)
    n = absw.shape[-1]
    # round() keeps 0.07 * 100 = 7.000000000000001 from turning rank 7 into rank 8.
    k = min(n, max(1, math.ceil(round(clamp_ratio * n, 9))))
    return absw.kthvalue(k, dim=-1).values


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, q_max: int) -> torch.Tensor:
    """ŵ = clamp(round(w / s), ±qmax) · s, with `scale` broadcastable to `w`; s = 0 gives 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe).clamp_(-q_max, q_max)
    return q * scale


def quantize_rows(
    w: torch.Tensor, bitwidth: int, *, group_size: int | None = None,
    clamp_ratio: float | None = None,
) -> torch.Tensor:
    """Fake-quantize each row (output channel) of a float32 [out, in] block.

    With `group_size`, each row is split into groups of that many inputs, each with its own
    scale; a trailing partial group is its own group. Vectorised over rows and groups.
    """
    rows, cols = w.shape
    q_max = qmax(bitwidth)
    if cols == 0:
        return w.clone()
    g = cols if group_size is None else min(group_size, cols)
    n_full, rem = divmod(cols, g)
    parts = []
    if n_full:
        full = w[:, : n_full * g].reshape(rows, n_full, g)                   # [out, G, g]
        scale = reference_magnitude(full.abs(), clamp_ratio) / q_max           # [out, G]
        parts.append(quantize_with_scale(full, scale.unsqueeze(-1), q_max).reshape(rows, -1))
    if rem:
        tail = w[:, n_full * g:]                                               # [out, rem]
        scale = reference_magnitude(tail.abs(), clamp_ratio) / q_max           # [out]
        parts.append(quantize_with_scale(tail, scale.unsqueeze(-1), q_max))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def tensor_scale(mat: torch.Tensor, bitwidth: int, clamp_ratio: float | None,
                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """One float32 scale for the whole matrix (per-tensor RTN).

    The absmax is reduced chunk by chunk; a clamp quantile needs all of |W| at once, so that
    path holds one copy of |W| in the weight's own dtype.
    """
    q_max = qmax(bitwidth)
    if clamp_ratio is not None:
        return reference_magnitude(mat.abs().reshape(1, -1), clamp_ratio)[0].float() / q_max
    amax = torch.zeros((), dtype=torch.float32, device=mat.device)
    for block in _row_chunks(mat, chunk_elements):
        amax = torch.maximum(amax, block.abs().amax().float())
    return amax / q_max


def fake_quantize_(
    weight: torch.Tensor, bitwidth: int, *, per_channel: bool = True,
    group_size: int | None = None, clamp_ratio: float | None = None,
    transposed: bool = False, chunk_elements: int = CHUNK_ELEMENTS,
) -> float:
    """Quantize a 2-D weight in place and return max |W − Ŵ| (in the weight's dtype).

    `transposed=False`: nn.Linear layout [out, in]; `True`: GPT-2 Conv1D layout [in, out],
    whose output channels are columns. Dtype and device are preserved.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if group_size is not None and not per_channel:
        raise ValueError("group_size needs per_channel=True (groups lie inside output channels)")
    mat = weight.t() if transposed else weight                                 # [out, in] view
    q_max = qmax(bitwidth)
    max_err = 0.0
    with torch.no_grad():
        scale = None if per_channel else tensor_scale(mat, bitwidth, clamp_ratio, chunk_elements)
        for block in _row_chunks(mat, chunk_elements):
            block32 = block.float()          # may alias `weight` when it is float32 already
            if scale is None:
                new32 = quantize_rows(block32, bitwidth, group_size=group_size,
                                      clamp_ratio=clamp_ratio)
            else:
                new32 = quantize_with_scale(block32, scale, q_max)
            new = new32.to(weight.dtype)
            if new.numel():
                max_err = max(max_err, float((new.float() - block32).abs().max()))
            block.copy_(new)
    return max_err


def _row_chunks(mat: torch.Tensor, chunk_elements: int):
    """Consecutive row slices (views) of at most ~chunk_elements elements each."""
    rows, cols = mat.shape
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows, step):
        yield mat[start:start + step]
