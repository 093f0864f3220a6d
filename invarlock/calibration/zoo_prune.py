"""Pruning families of the edit zoo that ship in practice: 2:4 semi-structured magnitude
pruning (what sparse tensor cores run) and Wanda (Sun et al. 2024: score |W_ij|·‖x_j‖, the
weight's magnitude times its input's norm on calibration tokens; prune the lowest half of
each output row). Both zero half the weights of the matrices they touch."""

from __future__ import annotations

import torch

from invarlock.calibration.zoo_base import (
    CalibrationText,
    NotApplicable,
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

WANDA_SPARSITY = 0.5     # the unstructured setting of the Wanda paper


def two_four(w: torch.Tensor) -> torch.Tensor:
    """`w` [out, in] with the two smallest |w| of every four consecutive inputs zeroed."""
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // 4, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    return groups.scatter(-1, drop, 0.0).reshape(out_f, in_f)


def prune24(model: torch.nn.Module, seed: int) -> EditResult:
    """2:4 magnitude pruning of every block matrix whose width is a multiple of 4 (seed 0),
    or of a random ~75% of them."""
    blocks = [b for b in block_matrices(model) if b.rows().shape[1] % 4 == 0]
    if not blocks:
        raise NotApplicable("prune24: no block matrix has a width that is a multiple of 4")
    chosen = blocks if seed == 0 else _subset(blocks, 0.75, _rng(seed, 18))
    for b in chosen:
        _write(b, two_four(b.rows().float()))
    return _result("prune24", seed, chosen, pattern="2:4")


def wanda_mask(w: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where Wanda keeps a weight: per output row, all but the `sparsity` share of
    inputs with the lowest |W_ij|·‖x_j‖."""
    score = w.abs() * input_norm[None, :]
    k = int(sparsity * w.shape[1])
    keep = torch.ones_like(w, dtype=torch.bool)
    if k:
        keep.scatter_(1, score.argsort(dim=1)[:, :k], False)
    return keep


def wanda(model: torch.nn.Module, seed: int, text: CalibrationText | None = None
          ) -> EditResult:
    """Wanda at 50% of every block matrix; the seed draws the calibration inputs (from
    `text` when given)."""
    blocks = block_matrices(model)
    ids = calibration_ids(model, _rng(seed, 19), text)
    norms = input_grams(model, blocks, ids, diagonal=True)
    for b, sq in zip(blocks, norms, strict=True):
        w = b.rows().float()
        keep = wanda_mask(w, sq.sqrt().float().to(w.device), WANDA_SPARSITY)
        _write(b, torch.where(keep, w, torch.zeros_like(w)))
    return _result("wanda", seed, blocks, sparsity=WANDA_SPARSITY,
                   **calibration_record(ids, text))
