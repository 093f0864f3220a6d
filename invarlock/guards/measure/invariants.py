"""Invariants probe: parameter tables, tying, finiteness, fingerprints (torch side)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from invarlock.families import family_of, module_name
from invarlock.guards import invariants as pure
from invarlock.guards.measure.probe import Probe, SubjectContext
from invarlock.guards.measure.weights import single_thread
from invarlock.models.effective import EffectiveWeights


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values a floating tensor holds.

    A float32 sum propagates NaN/Inf and reads the tensor once without a boolean copy; only
    a tensor whose sum is not finite (a NaN/Inf, or a finite overflow) is counted exactly.
    """
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def structure(model: torch.nn.Module) -> dict[str, Any]:
    """Names, shapes, tied groups and non-finite tensors of a model's state dict."""
    state = EffectiveWeights(model)  # effective float weights; format tensors left out
    shapes: dict[str, list[int]] = {}
    by_storage: dict[tuple, list[str]] = {}
    nonfinite = []
    checked: set[tuple] = set()
    for name in sorted(state):
        tensor = state[name].detach()
        shapes[name] = list(tensor.shape)
        if tensor.numel() == 0:
            continue
        key = (str(tensor.device), tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if name in state.quantized:  # dequantized anew: its address says nothing about tying
            key = ("dequantized", name)
        by_storage.setdefault(key, []).append(name)
        if key in checked or not tensor.dtype.is_floating_point:
            continue
        checked.add(key)
        bad = nonfinite_count(tensor)
        if bad:
            nonfinite.append({"parameter": name, "module": module_name(name),
                              "family": str(family_of(name)), "count": bad})
    table = json.dumps(shapes, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return {"shapes": shapes, "digest": "sha256:" + hashlib.sha256(table).hexdigest(),
            "tying": sorted(sorted(g) for g in by_storage.values() if len(g) > 1),
            "nonfinite": nonfinite}


def compare(base: Mapping[str, Any], subj: Mapping[str, Any]) -> dict[str, Any]:
    """Differences between two `structure` results (only differences are kept)."""
    b, s = base["shapes"], subj["shapes"]
    return {
        "parameters": len(s),
        "table_digest": {"baseline": base["digest"], "subject": subj["digest"]},
        "missing_in_subject": sorted(set(b) - set(s)),
        "unexpected_in_subject": sorted(set(s) - set(b)),
        "shape_mismatches": [{"name": k, "baseline": b[k], "subject": s[k]}
                             for k in sorted(set(b) & set(s)) if b[k] != s[k]],
        "tying": {"baseline": base["tying"], "subject": subj["tying"]},
        "nonfinite_baseline": list(base["nonfinite"]),
        "nonfinite_subject": list(subj["nonfinite"]),
    }


class InvariantsProbe(Probe):
    """Structure of the baseline when loaded; the subject's on load and at the end."""

    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        self._baseline: dict[str, Any] | None = None
        self._pre: dict[str, Any] | None = None
        self._before: str | None = None

    def baseline_loaded(self, model: Any) -> None:
        with single_thread():
            self._baseline = structure(model)

    def baseline_state(self) -> dict[str, Any]:
        return dict(self._baseline or {})

    def subject_loaded(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> None:
        from invarlock.models.loading import tensor_digest

        with single_thread():
            pre = compare(baseline, structure(ctx.model))
            before = ctx.fingerprint or tensor_digest(ctx.model)
        pre["config_differences"] = pure.config_differences(ctx.baseline_config, ctx.config)
        pre["ignored_config_keys"] = list(pure.IGNORED_CONFIG_KEYS)
        pre["tokenizer"] = {"baseline": ctx.tokenizer_hashes[0],
                            "subject": ctx.tokenizer_hashes[1]}
        self._pre = pre
        self._before = before

    def fatal_check(self) -> dict[str, Any] | None:
        return {"evaluated": True, "pre": self._pre, "post": None}

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        from invarlock.models.loading import tensor_digest

        broken = sum(int(s.nonfinite_windows) for s in ctx.scores.values() if s is not None)
        with single_thread():
            after = tensor_digest(ctx.model)
        post = {"fingerprint_before": self._before, "fingerprint_after": after,
                "nonfinite_windows": broken}
        return {"evaluated": True, "pre": self._pre, "post": post}
