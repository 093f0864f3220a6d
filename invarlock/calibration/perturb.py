"""Quantisation-noise-equivalent perturbation: the benign reference edit of calibration.

Round-to-nearest at step s leaves an error that behaves like uniform noise on [−s/2, s/2].
`quant_noise` adds exactly that noise instead of rounding: for every weight `quant_rtn`
would edit (same scope), per output channel, s = max|w| / qmax(bitwidth) and
W ← W + U(−s/2, s/2), drawn from a generator seeded with (seed, module index). Each seed is
a different benign edit of the same size as INT8 RTN, which is what null statistics need.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from invarlock.edits import Edit, EditResult
from invarlock.edits.quant_rtn import SCOPES, quantizable_modules
from invarlock.edits.rtn_math import qmax
from invarlock.errors import InputError

log = logging.getLogger(__name__)

NAME = "quant_noise"


@dataclass(frozen=True)
class NoisePlan:
    bitwidth: int = 8      # step size of the RTN grid the noise imitates
    seed: int = 0
    scope: str = "all"     # attn | ffn | all, as quant_rtn

    def __post_init__(self) -> None:
        if not isinstance(self.bitwidth, int) or not 2 <= self.bitwidth <= 8:
            raise InputError(f"quant_noise bitwidth must be an integer from 2 to 8, "
                             f"got {self.bitwidth!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"quant_noise seed must be a non-negative integer, got {self.seed!r}")
        if self.scope not in SCOPES:
            raise InputError(f"quant_noise scope must be one of {', '.join(SCOPES)}, "
                             f"got {self.scope!r}")


def parse_plan(section: Mapping[str, Any] | None) -> NoisePlan:
    plan = dict((section or {}).get("plan", section or {}))
    plan.pop("name", None)
    return NoisePlan(**plan)


def apply_noise(model: torch.nn.Module, plan: NoisePlan) -> EditResult:
    """Add INT-grid uniform noise to the scoped weights of `model`, in place."""
    q_max = qmax(plan.bitwidth)
    modules = quantizable_modules(model, plan.scope)
    params = 0
    max_err = 0.0
    with torch.no_grad():
        for index, (_name, module) in enumerate(modules):
            weight = module.weight
            rows = weight.t() if type(module).__name__ == "Conv1D" else weight  # [out, in]
            w32 = rows.float()
            step = w32.abs().amax(dim=1, keepdim=True) / q_max                  # [out, 1]
            gen = torch.Generator(device="cpu").manual_seed(plan.seed * 1_000_003 + index)
            noise = (torch.rand(w32.shape, generator=gen) - 0.5).to(w32.device) * step
            rows.copy_((w32 + noise).to(weight.dtype))
            params += weight.numel()
            max_err = max(max_err, float(noise.abs().max()) if noise.numel() else 0.0)
    log.info("quant_noise: seed %d, %d-bit step, %d modules", plan.seed, plan.bitwidth,
             len(modules))
    return EditResult(NAME, asdict(plan), tuple(n for n, _ in modules), params, max_err)


NOISE_EDIT = Edit(name=NAME, summary="uniform noise of one INT-b quantisation step per "
                                     "output channel (calibration reference)",
                  parse_plan=parse_plan, apply=apply_noise)
