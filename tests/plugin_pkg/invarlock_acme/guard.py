"""acme_norm: did the Frobenius norm of any 2-D weight move by more than a set fraction?

`decide` is pure (numpy only): `invarlock verify` re-runs it on the stored measurements.
The probe reads the baseline's norms when it is loaded and the subject's when it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from invarlock.guards.base import GuardDecision, Stage
from invarlock.guards.measure.probe import Probe

DEFAULT_LIMIT = 0.05


def _norms(model: Any) -> dict[str, float]:
    return {name: float(p.detach().float().norm()) for name, p in model.named_parameters()
            if p.ndim == 2}


class NormProbe(Probe):
    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        self.baseline_norms: dict[str, float] = {}

    def baseline_loaded(self, model: Any) -> None:
        self.baseline_norms = _norms(model)

    def baseline_state(self) -> dict[str, Any]:
        return {"norms": self.baseline_norms}

    def measure(self, ctx: Any, baseline: Mapping[str, Any]) -> dict[str, Any]:
        before = baseline.get("norms", {})
        after = _norms(ctx.model)
        return {"modules": [{"name": n, "baseline_norm": before[n], "subject_norm": after[n]}
                            for n in sorted(before) if n in after]}


class NormGuard:
    name = "acme_norm"
    flag = "acme_norm_stable"
    stages = (Stage.WEIGHTS,)
    measures = "Frobenius norm of every 2-D weight, baseline vs subject"

    def decide(self, measurements: Mapping[str, Any],
               policy: Mapping[str, Any]) -> GuardDecision:
        limit = float(policy.get("max_relative_change", DEFAULT_LIMIT))
        modules = measurements.get("modules") or []
        if not modules:
            return GuardDecision(True, "no 2-D weight measured")
        base = np.array([m["baseline_norm"] for m in modules], dtype=np.float64)
        subj = np.array([m["subject_norm"] for m in modules], dtype=np.float64)
        change = np.abs(subj / np.where(base == 0, 1.0, base) - 1.0)
        worst = int(np.argmax(change))
        over = [m["name"] for m, c in zip(modules, change, strict=True) if c > limit]
        findings = tuple({"module": n, "family": "other", "message": f"norm moved > {limit}"}
                         for n in over)
        reason = (f"largest norm change {change[worst]:.2%} ({modules[worst]['name']}), "
                  f"limit {limit:.2%}")
        return GuardDecision(not over, reason, findings, {"max_change": float(change[worst])})

    def probe(self, policy: Mapping[str, Any]) -> NormProbe:
        return NormProbe(policy)


GUARD = NormGuard()
