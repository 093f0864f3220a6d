"""RMT probe: sampled output rows of scoped linear modules on the calibration windows.

A tap on every Linear/Conv1D inside a transformer block (families from the policy's
`scope`) keeps, for each of the first K final windows, `ceil(max_rows / K)` token positions
chosen by a generator seeded with (seed, window id) among the attended positions, so both
models are sampled at exactly the same tokens. When a module has seen all K windows its
rows go to the pure `edge_risk` and are dropped: memory stays below
modules × max_rows × features × 4 bytes, and below one module's rows when the K windows
fit one batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from invarlock.families import block_index, family_of
from invarlock.guards.base import not_measured
from invarlock.guards.measure.probe import Probe, SubjectContext
from invarlock.guards.measure.weights import single_thread
from invarlock.guards.rmt import FAMILIES, edge_risk_from_gram

DEFAULT_MAX_ROWS = 128


def linear_modules(model: torch.nn.Module, scope: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Linear/Conv1D modules inside transformer blocks whose family is in scope."""
    out = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if not is_linear or block_index(name) is None:
            continue
        if str(family_of(name)) in scope:
            out.append((name, module))
    return out


def reduce_rows(y: torch.Tensor) -> dict[str, Any]:
    """Centre the sampled rows, form the smaller Gram matrix and feature variances (torch,
    one thread: small products gain nothing from a thread pool), then the pure edge risk."""
    m, n = y.shape
    with single_thread():
        yc = y - y.mean(dim=0, keepdim=True)
        gram = yc @ yc.T if m <= n else yc.T @ yc
        col_var = yc.square().mean(dim=0)
        risk = edge_risk_from_gram(gram.double().cpu().numpy(), col_var.double().cpu().numpy(),
                                   m, n)
    # a non-finite edge risk (inf/NaN activations) is stored as None: JSON has no inf
    return {"edge_risk": risk if np.isfinite(risk) else None, "rows": int(m),
            "features": int(n)}


class RowTap:
    """Observing tap that samples rows per window and reduces them to an edge risk."""

    def __init__(self, modules: list[tuple[str, Any]], ids: np.ndarray, rows_per_window: int,
                 seed: int, clock: Probe) -> None:
        self._modules = modules
        self._wanted = {int(i) for i in ids}
        self._k = len(self._wanted)
        self._rows = rows_per_window
        self._seed = seed
        self._clock = clock
        self._positions: dict[int, np.ndarray] = {}
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._seen: dict[str, int] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def modules(self, model: Any) -> list[tuple[str, Any]]:
        return self._modules

    def _select(self, context: Any) -> tuple[list[int], list[np.ndarray]]:
        batch_rows, positions = [], []
        mask = None
        for b, wid in enumerate(context.window_ids.tolist()):
            if wid not in self._wanted:
                continue
            if wid not in self._positions:
                if mask is None:
                    mask = context.attention_mask.detach().cpu().numpy()
                attended = np.flatnonzero(mask[b])
                rng = np.random.default_rng([self._seed, wid])
                take = min(self._rows, attended.size)
                self._positions[wid] = np.sort(rng.choice(attended, size=take, replace=False))
            batch_rows.append(b)
            positions.append(self._positions[wid])
        return batch_rows, positions

    def observe(self, name: str, output: Any, context: Any) -> None:
        started = time.perf_counter()
        try:
            y = output[0] if isinstance(output, tuple) else output
            if not isinstance(y, torch.Tensor) or y.dim() != 3 or name in self.results:
                return
            rows, positions = self._select(context)
            if not rows:
                return
            b = torch.as_tensor(np.repeat(rows, [p.size for p in positions]), device=y.device)
            t = torch.as_tensor(np.concatenate(positions), device=y.device)
            self._buffers.setdefault(name, []).append(y[b, t].detach().to(torch.float32))
            self._seen[name] = self._seen.get(name, 0) + len(rows)
            if self._seen[name] >= self._k:
                self.results[name] = reduce_rows(torch.cat(self._buffers.pop(name)))
        finally:
            self._clock.seconds += time.perf_counter() - started


class RMTProbe(Probe):
    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        scope = policy.get("scope", "all")
        self.scope = FAMILIES if scope == "all" else tuple(
            [scope] if isinstance(scope, str) else scope)
        self.max_rows = int(policy.get("max_rows", DEFAULT_MAX_ROWS))
        self.cache_settings = {"version": 1, "scope": list(self.scope), "max_rows": self.max_rows}
        self._taps: dict[str, RowTap] = {}

    def _rows_per_window(self) -> int:
        assert self.info is not None
        return max(2, math.ceil(self.max_rows / max(1, self.info.calibration_ids.size)))

    def taps(self, model: Any, role: str, phase: str) -> list[Any]:
        if phase != "final" or self.info is None or self.info.calibration_ids.size == 0:
            return []
        tap = RowTap(linear_modules(model, self.scope), self.info.calibration_ids,
                     self._rows_per_window(), self.info.seed, self)
        self._taps[role] = tap
        return [tap]

    def baseline_state(self) -> dict[str, Any]:
        tap = self._taps.pop("baseline", None)  # drop its module references: the baseline can go
        return {"modules": dict(tap.results) if tap else {}}

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        tap = self._taps.get("subject")
        if ctx.scores.get("final") is None or tap is None:
            return not_measured("the final windows were not evaluated")
        base = baseline.get("modules", {})
        modules = []
        for name, subj in tap.results.items():
            if name not in base:
                continue
            modules.append({"name": name, "family": str(family_of(name)),
                            "baseline": base[name]["edge_risk"],
                            "subject": subj["edge_risk"],
                            "rows": subj["rows"], "features": subj["features"]})
        return {"evaluated": True, "windows": int(self.info.calibration_ids.size),
                "window_ids": [int(i) for i in self.info.calibration_ids],
                "rows_per_window": self._rows_per_window(), "max_rows": self.max_rows,
                "standardisation": "column-centred, one global scale", "modules": modules}
