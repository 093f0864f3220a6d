"""GPTQ-style 4-bit quantization for the edit zoo: round-to-nearest with error feedback.

GPTQ (Frantar et al. 2023, "OPTQ") quantizes a matrix's input columns in order; each column's
rounding error, divided by the diagonal of the inverse Hessian H⁻¹ (H = XᵀX of calibration
inputs X), is pushed onto the columns not yet quantized along the matching row of H⁻¹'s
Cholesky factor, so that the layer's output XWᵀ moves as little as the grid allows. Written
here from the paper for the zoo, independent of any quantizer the product ships.

Calibration inputs: 8 × 128 seeded random tokens, or 32 windows of held-out text
(`zoo_base.CalibrationText`), one pass over them per chunk of matrices
whose Hessians fit in memory together; a chunk's inputs come from the model with the chunks
before it already quantized (GPTQ proper re-runs every layer on its quantized
predecessors).
"""

from __future__ import annotations

import torch

from invarlock.calibration.zoo_base import (
    Block,
    CalibrationText,
    _result,
    _rng,
    _subset,
    _write,
    block_matrices,
    calibration_ids,
    calibration_record,
    input_grams,
)
from invarlock.edits.result import EditResult

DAMP = 0.01              # H + 1% of its mean diagonal: GPTQ's default dampening
GRAM_BUDGET = 1 << 24    # XᵀX elements held at once (128 MiB in float64): chunked passes


def _grid_scale(w: torch.Tensor, q: int) -> torch.Tensor:
    """Symmetric absmax scale per row of `w` [out, g] (1 where a row is all zeros)."""
    scale = w.abs().amax(dim=1) / q
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int,
         group: int | None) -> torch.Tensor:
    """GPTQ of a float [out, in] matrix on the symmetric absmax grid of `rtn` (per row, or
    per group of `group` inputs where the width is a multiple of it), given H = XᵀX [in, in].

    Columns go left to right; the scale of each group is taken from its columns as they are
    when the group starts (after the error feedback of the groups before it)."""
    qmax = 2 ** (bits - 1) - 1
    in_f = w.shape[1]
    g = in_f if group is None or in_f % group else group
    w = w.float().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0            # inputs never seen: nothing to preserve
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMP * torch.diagonal(h).mean() * torch.eye(in_f, dtype=h.dtype)
    # the factorisations in float64, the column loop in float32 (as GPTQ's own code)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                 upper=True).float()
    quant = torch.zeros_like(w)
    block = g if g <= 256 else 128           # one group per block, or blocks inside a row group
    scale = _grid_scale(w, qmax)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        work = w[:, i1:i2].clone()
        errors = torch.zeros_like(work)
        hb = hinv[i1:i2, i1:i2]
        if g < in_f:
            scale = _grid_scale(work, qmax)      # this block is exactly one group
        for i in range(i2 - i1):
            col = work[:, i]
            q = torch.round(col / scale).clamp(-qmax, qmax) * scale
            quant[:, i1 + i] = q
            err = (col - q) / hb[i, i]
            work[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return quant


def output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖X(W − Q)ᵀ‖²_F = tr((W − Q) H (W − Q)ᵀ): what GPTQ minimises, on the inputs of H."""
    d = w.detach().double() - q.detach().double()
    return float(torch.einsum("oi,ij,oj->", d, hessian.detach().double(), d))


def _chunks(blocks: list[Block]) -> list[list[Block]]:
    """Consecutive block matrices whose XᵀX fit `GRAM_BUDGET` together."""
    out: list[list[Block]] = [[]]
    size = 0
    for b in blocks:
        n = b.rows().shape[1] ** 2
        if out[-1] and size + n > GRAM_BUDGET:
            out.append([])
            size = 0
        out[-1].append(b)
        size += n
    return out


def gptq4(model: torch.nn.Module, seed: int, text: CalibrationText | None = None
          ) -> EditResult:
    """4-bit GPTQ per group of 128 inputs, every block matrix (seed 0) or a random ~90% of
    them; the seed also draws the calibration inputs (from `text` when given)."""
    blocks = block_matrices(model)
    chosen = blocks if seed == 0 else _subset(blocks, 0.9, _rng(seed, 16))
    ids = calibration_ids(model, _rng(seed, 17), text)  # the same ids for every chunk
    for chunk in _chunks(chosen):
        grams = input_grams(model, chunk, ids)
        for b, h in zip(chunk, grams, strict=True):
            _write(b, gptq(b.rows().float(), h, 4, 128))
    return _result("gptq4", seed, chosen, group_size=128, **calibration_record(ids, text))
