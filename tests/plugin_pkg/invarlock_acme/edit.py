"""acme_scale: multiply every attention weight matrix by (1 + factor)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock.edits import Edit, EditResult
from invarlock.errors import InputError
from invarlock.families import family_of


def parse_plan(section: Mapping[str, Any] | None) -> dict[str, float]:
    plan = dict((section or {}).get("plan") or {})
    unknown = set(plan) - {"factor"}
    if unknown:
        raise InputError(f"edit.plan: unknown key(s) for acme_scale: {', '.join(sorted(unknown))}")
    factor = float(plan.get("factor", 0.001))
    if not 0 <= factor < 1:
        raise InputError(f"edit.plan.factor must lie in [0, 1), got {factor}")
    return {"factor": factor}


def apply(model: Any, plan: dict[str, float]) -> EditResult:
    import torch

    changed, params, err = [], 0, 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and str(family_of(name)) == "attn":
                before = param.detach().clone()
                param.mul_(1.0 + plan["factor"])
                changed.append(name.rsplit(".", 1)[0])
                params += param.numel()
                err = max(err, float((param - before).abs().max()))
    return EditResult(name="acme_scale", plan=dict(plan), modules_changed=tuple(changed),
                      params_changed=params, max_abs_error=err)


EDIT = Edit(name="acme_scale", summary="scale attention weights by (1 + factor)",
            parse_plan=parse_plan, apply=apply)
