"""Whether a loaded model's weights are usable as evidence at all."""

from __future__ import annotations

import torch


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN or Inf (floating tensors only)."""
    bad = []
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad
