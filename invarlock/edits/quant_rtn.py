"""The built-in `quant_rtn` edit: symmetric round-to-nearest fake quantization of weights.

Only the weight matrices of nn.Linear and GPT-2 style Conv1D modules inside transformer
blocks are rewritten, selected by module family (`attn`, `ffn`, or `all` = both). Embeddings,
lm_head, pooler and classifier heads are never edited, nor is any weight tied to an embedding;
biases stay as they are. The edit works in place on the in-memory model it is given (the
pipeline passes its own copy) and never touches files. The math is in `rtn_math`.

Plan parsing and validation import no torch, so a bad plan is reported before any model loads.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from invarlock.edits.result import EditResult
from invarlock.enums import Family
from invarlock.errors import InputError, nearest_hint
from invarlock.families import block_index, family_of

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NAME = "quant_rtn"
SCOPES: dict[str, frozenset[Family]] = {
    "attn": frozenset({Family.ATTN}),
    "ffn": frozenset({Family.FFN}),
    "all": frozenset({Family.ATTN, Family.FFN}),
}


@dataclass(frozen=True)
class QuantRTNPlan:
    """What to quantize and how; every construction is validated (InputError, one line)."""

    bitwidth: int = 8                 # INT8: the benign reference edit
    per_channel: bool = True          # one scale per output channel; False: one per tensor
    group_size: int | None = None     # inputs per scale inside a channel; None: whole channel
    clamp_ratio: float | None = None  # scale from this quantile of |w|; None: absmax
    scope: str = "all"                # attn | ffn | all (= attn + ffn)
    max_modules: int | None = None    # first N matching modules in model order; None: all

    def __post_init__(self) -> None:
        if not _is_int(self.bitwidth) or not 2 <= self.bitwidth <= 8:
            _bad("bitwidth", "must be an integer from 2 to 8", self.bitwidth)
        if not isinstance(self.per_channel, bool):
            _bad("per_channel", "must be true or false", self.per_channel)
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            _bad("group_size", "must be an integer >= 1 or null", self.group_size)
        if self.group_size is not None and not self.per_channel:
            raise InputError("edit.plan.group_size needs per_channel: true "
                             "(groups lie inside output channels)")
        if self.clamp_ratio is not None:
            ok = isinstance(self.clamp_ratio, (int, float)) and not isinstance(
                self.clamp_ratio, bool) and 0 < self.clamp_ratio <= 1
            if not ok:
                _bad("clamp_ratio", "must be a number in (0, 1] or null", self.clamp_ratio)
            object.__setattr__(self, "clamp_ratio", float(self.clamp_ratio))
        if self.scope not in SCOPES:
            choices = ", ".join(repr(s) for s in SCOPES)
            _bad("scope", f"must be one of {choices}", self.scope)
        if self.max_modules is not None and (
                not _is_int(self.max_modules) or self.max_modules < 1):
            _bad("max_modules", "must be an integer >= 1 or null", self.max_modules)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PLAN_KEYS = tuple(f.name for f in dataclasses.fields(QuantRTNPlan))


def edit_plan_from_config(section: Mapping[str, Any] | None) -> QuantRTNPlan:
    """Build a plan from config: the whole `edit:` section or just its `plan:` mapping.

    `{name: quant_rtn, plan: {...}}` is recognised by its `name`/`plan` keys; any other mapping
    is read as the plan itself. None or an empty mapping gives the defaults (INT8, per channel,
    all of attn + ffn). Unknown keys and bad values raise InputError naming the key.
    """
    if section is None:
        return QuantRTNPlan()
    if not isinstance(section, Mapping):
        raise InputError(f"edit must be a mapping, got {type(section).__name__}")
    if "name" in section or "plan" in section:
        _check_keys(section, ("name", "plan"), "edit",
                    hint=" (plan settings go under edit.plan)")
        if section.get("name", NAME) != NAME:
            raise InputError(f"edit.name: unknown edit {section['name']!r}; "
                             f"this parser reads {NAME!r}")
        plan = section.get("plan")
        if plan is None:
            return QuantRTNPlan()
        if not isinstance(plan, Mapping):
            raise InputError(f"edit.plan must be a mapping, got {type(plan).__name__}")
        section = plan
    _check_keys(section, _PLAN_KEYS, "edit.plan")
    return QuantRTNPlan(**{k: section[k] for k in _PLAN_KEYS if k in section})


def quantizable_modules(model: torch.nn.Module, scope: str) -> list[tuple[str, torch.nn.Module]]:
    """The modules `quant_rtn` would edit for `scope`, in model order, each weight once.

    Linear or Conv1D, inside a transformer block, family in scope, weight not tied to an
    embedding. Requiring a block keeps heads out even when their leaf name looks like
    attention (e.g. a RoBERTa classifier's `out_proj`).
    """
    import torch

    if scope not in SCOPES:
        _bad("scope", "must be one of " + ", ".join(repr(s) for s in SCOPES), scope)
    families = SCOPES[scope]
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    embedding_ptrs = {_ptr(m.weight) for m in model.modules()
                      if isinstance(m, torch.nn.Embedding)} - {0}
    seen: set[int] = set()
    selected = []
    for name, module in model.named_modules():
        if _layout(module) is None or module.weight.dim() != 2:
            continue
        if family_of(name) not in families or block_index(name) is None:
            continue
        weight = module.weight
        if id(weight) in embedding_weights or _ptr(weight) in embedding_ptrs:
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        selected.append((name, module))
    return selected


def apply_quant_rtn(model: torch.nn.Module, plan: QuantRTNPlan) -> EditResult:
    """Fake-quantize the planned weights of `model` in place; return what was changed."""
    from invarlock.edits import rtn_math

    modules = quantizable_modules(model, plan.scope)
    if not modules:
        raise InputError(f"edit.plan.scope {plan.scope!r} matches no Linear/Conv1D weight inside "
                         f"the transformer blocks of {type(model).__name__}; nothing to quantize")
    if plan.max_modules is not None:
        modules = modules[: plan.max_modules]
    for name, module in modules:
        weight = module.weight
        if not weight.dtype.is_floating_point or weight.is_meta:
            raise InputError(f"cannot quantize {name}: its weight is {weight.dtype} on "
                             f"{weight.device.type}, not a materialised floating-point tensor")
    started = time.perf_counter()
    max_err = 0.0
    params = 0
    for name, module in modules:
        err = rtn_math.fake_quantize_(
            module.weight, plan.bitwidth, per_channel=plan.per_channel,
            group_size=plan.group_size, clamp_ratio=plan.clamp_ratio,
            transposed=_layout(module) == "conv1d",
        )
        logger.debug("quant_rtn %s: max |W - W_q| = %.3g", name, err)
        max_err = max(max_err, err)
        params += module.weight.numel()
    logger.info("quant_rtn: %d-bit on %d modules (%d weights) in %.2fs, max |W - W_q| = %.3g",
                plan.bitwidth, len(modules), params, time.perf_counter() - started, max_err)
    return EditResult(name=NAME, plan=plan.to_dict(),
                      modules_changed=tuple(name for name, _ in modules),
                      params_changed=params, max_abs_error=max_err)


def _layout(module: Any) -> str | None:
    """'linear' for nn.Linear ([out, in]), 'conv1d' for transformers' Conv1D ([in, out])."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
            getattr(module, "weight", None), torch.Tensor):
        return "conv1d"
    return None


def _ptr(tensor: Any) -> int:
    return 0 if tensor.is_meta else tensor.data_ptr()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(key: str, rule: str, value: Any) -> None:
    raise InputError(f"edit.plan.{key} {rule}, got {value!r}")


def _check_keys(mapping: Mapping[str, Any], allowed: tuple[str, ...], where: str,
                hint: str = "") -> None:
    for key in mapping:
        if key not in allowed:
            tip = nearest_hint(str(key), allowed)
            extra = "" if tip.startswith("; did you mean") else hint
            raise InputError(f"unknown key '{where}.{key}'{tip}{extra}")
