"""Edits the certifier can apply itself, by name: a plan parser and an apply function each.

`invarlock plugins edits` lists `EDITS`; the pipeline looks an edit up with `get_edit`, parses
the config's `edit:` section with `parse_plan` and applies it to its own in-memory copy of the
baseline. Nothing here imports torch, so listing and plan validation work without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from invarlock.edits.quant_rtn import QuantRTNPlan, apply_quant_rtn, edit_plan_from_config
from invarlock.edits.result import EditResult
from invarlock.errors import InputError

__all__ = ["EDITS", "Edit", "EditResult", "QuantRTNPlan", "apply_quant_rtn",
           "edit_plan_from_config", "get_edit"]


@dataclass(frozen=True)
class Edit:
    """A named edit: `parse_plan(edit_section) -> plan`, `apply(model, plan) -> EditResult`.

    `reproducible`: the same plan applied to the same weights always gives the same tensors,
    so a subject let go can be rebuilt from a fresh baseline load (one model resident at a
    time, `invarlock.stages.alternate`); an edit that does not say so is never rebuilt."""

    name: str
    summary: str
    parse_plan: Callable[[Mapping[str, Any] | None], Any]
    apply: Callable[[Any, Any], EditResult]
    reproducible: bool = False


EDITS: dict[str, Edit] = {
    "quant_rtn": Edit(
        name="quant_rtn",
        summary="symmetric round-to-nearest weight quantization, 2-8 bits, "
                "per channel / group / tensor",
        parse_plan=edit_plan_from_config,
        apply=apply_quant_rtn,
        reproducible=True,  # round to nearest: no randomness, no data read
    ),
}


def get_edit(name: str) -> Edit:
    """The edit registered under `name` (built-in, then `invarlock.edits` entry points)."""
    if name in EDITS:
        return EDITS[name]
    from invarlock import plugins

    found = plugins.edit_plugin(name)
    if found is not None:
        return found
    known = ", ".join(sorted({*EDITS, *(c.name for c in plugins.discovered("edits")
                                         if c.error is None)}))
    raise InputError(f"unknown edit {name!r}; available: {known}")
