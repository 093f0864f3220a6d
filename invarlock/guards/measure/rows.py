"""Rows probe: the per-row change of every tensor outside the block matrices.

Baseline (when it is loaded): which tensors are in scope (1-D parameters anywhere; 2-D and
larger ones of the `embed` and `other` families: embeddings, untied heads, classifiers),
tied tensors once, and the transform plan (`invarlock.guards.measure.fold`) that says which
norm feeds which linear. Both are cached with the baseline's results.

Subject: each tensor is compared with the baseline's, streamed from its files. A norm whose
scale its linears absorb is compared as (γ + offset)·‖W[:, i]‖ (and its shift as β·‖W[:, i]‖)
over the linears it feeds, a head fed by such a norm as W·diag(γ), and the bias of a balanced
pair's producer (fused q/k/v, `v_proj`, `up_proj`) times its outputs' balancing scale
(`fold.output_scales`; the subject's with its classes' signs aligned with the baseline's), so
the function-preserving rescalings SmoothQuant, AWQ and SmoothAttention apply, and sign
flips of a pair's channels, change nothing here. A plain 2-D tensor of `ROW_BLOCKS_MIN_ELEMENTS`
or more (an embedding, an untied head) is read from the files a block of rows at a time
(`blockwise_row_change`), never whole beside the subject's. The decision is
`invarlock.guards.rows.decide`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from invarlock.families import family_of
from invarlock.guards.base import not_measured
from invarlock.guards.measure.fold import (
    Reference,
    balanced,
    folded,
    is_plain,
    output_scales,
    transform_plan,
)
from invarlock.guards.measure.probe import Probe, SubjectContext
from invarlock.guards.measure.weights import (
    WeightReader,
    paired_getters,
    row_blocks,
    single_thread,
)
from invarlock.models.effective import EffectiveWeights

log = logging.getLogger(__name__)

# A row whose baseline norm is below this fraction of the tensor's rms row norm is compared
# with that floor: a near-empty row (an unused token) carries little, and a per-tensor
# quantization scale moves it by a large share of its own tiny norm.
ROW_FLOOR = 0.1
TOP_ROWS = 8  # largest changes kept per tensor, for the findings


def in_scope(name: str, tensor: torch.Tensor) -> bool:
    """1-D floating parameters anywhere; larger ones outside the attention and FFN blocks."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return False
    return tensor.dim() == 1 or str(family_of(name)) in ("embed", "other")


def relative_row_change(base: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
    """‖s_i − b_i‖ / max(‖b_i‖, ROW_FLOOR·rms_j ‖b_j‖) per row of [rows, ...] tensors
    (1-D: per element); a change of an all-zero tensor is infinite."""
    return _relative(*_row_norms(base, subject))


def _row_norms(base: torch.Tensor, subject: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖s_i − b_i‖, ‖b_i‖) per row."""
    b = base.to(torch.float32).reshape(base.shape[0], -1)
    s = subject.to(device=b.device, dtype=torch.float32).reshape(b.shape)
    return (s - b).norm(dim=1), b.norm(dim=1)


def blockwise_row_change(read: Callable[[int, int], torch.Tensor], subject: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor | None:
    """`relative_row_change` of a baseline read by row blocks (as `dtype`, the subject
    parameter's: what a whole read is converted to); None where bit-identical."""
    rows = int(subject.shape[0])
    columns = subject.numel() // max(1, rows)
    diffs, norms, same = [], [], True
    for lo, hi, block in row_blocks(read, rows, columns):
        b = block.to(dtype).to(subject.device)
        same = same and torch.equal(b, subject[lo:hi])
        diff, norm = _row_norms(b, subject[lo:hi])
        diffs.append(diff)
        norms.append(norm)
    return None if same else _relative(torch.cat(diffs), torch.cat(norms))


def _relative(diff: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    floor = ROW_FLOOR * float(norm.square().mean().sqrt())
    if floor == 0.0:
        return torch.where(diff > 0, torch.inf, 0.0)
    return torch.nan_to_num(diff / norm.clamp_min(floor), nan=torch.inf)


def norm_consumers(plan: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{norm weight name: [{"linear", "transposed", "offset"}]} from a transform plan."""
    out: dict[str, list[dict[str, Any]]] = {}
    for linear, entry in plan.items():
        fold = (entry or {}).get("fold")
        if fold:
            out.setdefault(fold["norm"], []).append(
                {"linear": linear, "transposed": bool(fold["transposed"]),
                 "offset": float(fold["offset"])})
    return out


def channel_norms(consumers: list[Mapping[str, Any]], get: Callable[[str], torch.Tensor],
                  plan: Mapping[str, Any] | None = None,
                  memo: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """‖W[:, i]‖ over all the linears a norm feeds (GPT-2's Conv1D stores [in, out]), each W
    balanced in its pairs when a plan is given (a q/k or value rescaling moves no column)."""
    total = None
    for c in consumers:
        w = get(c["linear"]).to(torch.float32) if plan is None else \
            balanced(c["linear"], get, plan, memo)
        sq = w.square().sum(dim=1 if c["transposed"] else 0)
        total = sq if total is None else total + sq.to(total.device)
    return total.sqrt()


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


class RowsProbe(Probe):
    cache_settings: ClassVar[dict[str, Any]] = {"version": 2}

    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        self._state: dict[str, Any] = {}
        self._result: dict[str, Any] | None = None

    def baseline_loaded(self, model: Any) -> None:
        with single_thread():
            plan = transform_plan(model)
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(p.data_ptr(), []).append(name)
        modules = dict(model.named_modules())
        tensors = []
        for name, p in model.named_parameters():  # tied tensors once, by their first name
            if in_scope(name, p):
                entry = {"name": name, "shape": list(p.shape),
                         "aliases": [a for a in aliases[p.data_ptr()] if a != name]}
                weight = f"{_module_of(name)}.weight"
                if name.endswith(".bias") and (plan.get(weight) or {}).get("balance"):
                    module = modules.get(_module_of(name))
                    entry["balanced_with"] = {
                        "weight": weight, "conv1d": type(module).__name__ == "Conv1D"}
                tensors.append(entry)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self._state = {"tensors": tensors, "transforms": plan,
                       "vocab_size": int(vocab) if vocab else None}

    def baseline_state(self) -> dict[str, Any]:
        return self._state

    def subject_loaded(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> None:
        reader = WeightReader(ctx.baseline_files)
        params = EffectiveWeights(ctx.model)
        plan = baseline.get("transforms") or {}
        consumers = norm_consumers(plan)
        vocab = baseline.get("vocab_size") or (ctx.config or {}).get("vocab_size")
        seen_ids = None if self.info is None else self.info.tokens_seen
        tau = float(self.policy["tau"])

        base_get, subject_get = paired_getters(reader, params, ctx.base_model_prefix,
                                               ctx.model)

        records, unmatched = [], []
        memos: tuple[dict, dict] = ({}, {})  # each model's pair scales, formed once
        with torch.inference_mode(), single_thread():
            for entry in baseline.get("tensors") or []:
                name = entry["name"]
                if name not in params or list(params.shape(name)) != entry["shape"]:
                    unmatched.append(name)
                    continue
                seen = _seen_rows(entry["shape"][0], vocab, seen_ids)
                try:
                    read = None if not is_plain(name, plan) else reader.large_rows(
                        name, tuple(entry["shape"]), ctx.base_model_prefix, ctx.model)
                    if read is not None:  # an embedding or head: never whole beside s
                        subject = params[name].detach()
                        change = blockwise_row_change(read, subject, subject.dtype)
                        records.append(_record(name, "rows", entry, entry["shape"][0],
                                               change, seen, tau))
                        continue
                    kind, b, s = self._forms(entry, base_get, subject_get, plan, consumers,
                                             memos)
                except KeyError:
                    unmatched.append(name)
                    continue
                s = s.to(b.device)
                change = None if torch.equal(b, s) else relative_row_change(b, s)
                records.append(_record(name, kind, entry, int(b.shape[0]), change, seen, tau))
        if unmatched:
            log.warning("rows: %d baseline tensor(s) not comparable (first: %s)",
                        len(unmatched), unmatched[0])
        coverage = None
        if vocab and seen_ids is not None:
            n_seen = int(np.count_nonzero((seen_ids >= 0) & (seen_ids < int(vocab))))
            coverage = {"vocab_size": int(vocab), "tokens_seen": n_seen,
                        "coverage": n_seen / int(vocab)}
        self._result = {"evaluated": True, "tau": tau, "tensors": records,
                        "unmatched": unmatched, "vocabulary": coverage,
                        "method": {"row_floor": ROW_FLOOR, "top_rows": TOP_ROWS,
                                   "folded_norms": "(γ + offset)·‖W[:, i]‖, β·‖W[:, i]‖",
                                   "balanced": "W, producer biases in their pairs' balanced "
                                               "form"}}

    @staticmethod
    def _forms(entry: Mapping[str, Any], base_get: Callable[[str], torch.Tensor],
               subject_get: Callable[[str], torch.Tensor], plan: Mapping[str, Any],
               consumers: Mapping[str, list[dict[str, Any]]],
               memos: tuple[dict, dict] = ({}, {})) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(kind, baseline form, subject form) of one tensor, as the function depends on it."""
        name = entry["name"]
        module = _module_of(name)
        norm = name if name in consumers else f"{module}.weight"
        if norm in consumers and name in (norm, f"{module}.bias"):
            offset = consumers[norm][0]["offset"] if name == norm else 0.0
            forms = []
            for get, memo in zip((base_get, subject_get), memos, strict=True):
                scale = get(name).to(torch.float32) + offset
                forms.append(scale * channel_norms(consumers[norm], get, plan, memo).to(
                    scale.device))
            return "folded channels", forms[0], forms[1]
        if (plan.get(name) or {}).get("fold"):
            return "folded rows", folded(name, base_get, plan), folded(name, subject_get, plan)
        pair = entry.get("balanced_with")
        if pair:  # a producer's bias scales with its outputs: compare the balanced outputs
            forms = []  # (the subject's with its pairs' signs aligned with the baseline's)
            references = (None, Reference(base_get, memos[0]))
            for get, memo, ref in zip((base_get, subject_get), memos, references, strict=True):
                bias = get(name).to(torch.float32)
                factor = output_scales(pair["weight"], get, plan, conv1d=bool(pair["conv1d"]),
                                       memo=memo, reference=ref)
                forms.append(bias if factor is None else bias * factor.to(bias.device))
            return "balanced channels", forms[0], forms[1]
        b, s = base_get(name), subject_get(name)
        return ("channels" if b.dim() == 1 else "rows"), b, s.to(b.device)

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("rows probe measured before the subject was loaded")
        if not self._result["tensors"]:
            return {**not_measured("no embedding, head, norm or bias of the baseline could be "
                                   "compared with the subject"),
                    "unmatched": list(self._result["unmatched"])}
        return self._result


def _seen_rows(rows: int, vocab: int | None, seen_ids: np.ndarray | None) -> np.ndarray | None:
    """For a vocabulary-indexed tensor (as many rows as the vocabulary): which rows belong to
    tokens the windows contain; None for any other tensor."""
    if not vocab or rows != int(vocab) or seen_ids is None:
        return None
    seen = np.zeros(rows, dtype=bool)
    ids = seen_ids[(seen_ids >= 0) & (seen_ids < rows)]
    seen[ids] = True
    return seen


def _record(name: str, kind: str, entry: Mapping[str, Any], rows: int,
            change_rows: torch.Tensor | None, seen: np.ndarray | None,
            tau: float) -> dict[str, Any]:
    """The tensor's record from its per-row change (None: bit-identical)."""
    record: dict[str, Any] = {
        "name": name, "family": str(family_of(name)), "kind": kind, "rows": rows,
        "aliases": list(entry.get("aliases") or []), "vocabulary": seen is not None,
        "unseen_rows": None if seen is None else int(rows - seen.sum()),
        "changed": False, "max_change": 0.0, "beyond": {"seen": 0, "unseen": 0}, "top": []}
    if change_rows is None:
        return record
    change = change_rows.cpu().numpy().astype(np.float64)
    over = change > tau
    unseen = np.zeros(rows, dtype=bool) if seen is None else ~seen
    top = np.argsort(-change, kind="stable")[:TOP_ROWS]
    record.update(
        changed=True, max_change=_json(float(change.max())),
        beyond={"seen": int(np.count_nonzero(over & ~unseen)),
                "unseen": int(np.count_nonzero(over & unseen))},
        top=[{"row": int(i), "change": _json(float(change[i])),
              "seen": None if seen is None else bool(seen[i])} for i in top if change[i] > 0])
    return record


def _json(x: float) -> float | None:
    """JSON has no inf/NaN: a change that is not finite is stored as None."""
    return x if math.isfinite(x) else None
