"""RMT probe: sampled output rows of scoped linear modules on the calibration windows.

A tap on every Linear/Conv1D inside a transformer block (families from the policy's
`scope`) keeps, for each of the first K final windows, `ceil(max_rows / K)` token positions
chosen by a generator seeded with (seed, window id) among the attended positions, so both
models are sampled at exactly the same tokens. The K windows are split into G groups in
order (`groups`); as soon as a module has seen every window of a group, that group's rows
go to the pure `normalized_spectrum` and are dropped: groups are consecutive windows, so
at most one group per module waits for the next batch, and memory stays below
modules × one group's rows × features × 4 bytes.

Rescaling invariance: a function-preserving rescaling (AWQ's v→o and up→down scales,
SmoothAttention's q/k scales) multiplies a producer's output channels by t and leaves the
function unchanged, so the sampled rows of a producer are multiplied by the balancing scale
of its pair (`fold.output_scales`, computed from each model's own weights with the
baseline's transform plan): y·s is the output of the balanced producer, which no such
rescaling changes. Consumers' outputs and linears fed by a norm need nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from invarlock.families import block_index, family_of
from invarlock.guards.base import not_measured
from invarlock.guards.measure.fold import output_scales, transform_plan
from invarlock.guards.measure.probe import Probe, SubjectContext
from invarlock.guards.measure.weights import single_thread
from invarlock.guards.rmt import FAMILIES, kept, normalized_spectrum
from invarlock.models.effective import EffectiveWeights, is_quantized

DEFAULT_MAX_ROWS = 256
DEFAULT_GROUPS = 4


def linear_modules(model: torch.nn.Module, scope: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Linear/Conv1D modules inside transformer blocks whose family is in scope."""
    out = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        is_linear = is_linear or is_quantized(module)
        if not is_linear or block_index(name) is None:
            continue
        if str(family_of(name)) in scope:
            out.append((name, module))
    return out


def balancing_factors(model: torch.nn.Module, modules: list[tuple[str, Any]],
                      plan: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{module name: float32 factor per output feature} for the tapped producers of a
    function-preserving pair (their outputs times it are the balanced producer's)."""
    weights = EffectiveWeights(model)  # quantized weights dequantized one at a time
    out = {}
    memo: dict[str, torch.Tensor] = {}  # each pair's scale formed once, for both sides
    with torch.inference_mode(), single_thread():
        for name, module in modules:
            if f"{name}.weight" not in plan:
                continue
            factor = output_scales(f"{name}.weight", lambda n: weights[n].detach(), plan,
                                   conv1d=type(module).__name__ == "Conv1D", memo=memo)
            if factor is not None:
                out[name] = factor.to(torch.float32).cpu().numpy()
    return out


def reduce_rows(y: np.ndarray) -> list[float | None]:
    """Centre the sampled rows (float32, features in columns), form the smaller Gram matrix
    and the feature variances, then the pure spectrum (values stored)."""
    m, n = y.shape
    yc = torch.from_numpy(y - y.mean(axis=0, dtype=np.float64).astype(np.float32))
    gram = (yc @ yc.T if m <= n else yc.T @ yc).double().numpy()
    col_var = np.square(yc.numpy(), dtype=np.float64).mean(axis=0)
    return kept(normalized_spectrum(gram, col_var, m, n))


def window_groups(ids: np.ndarray, groups: int) -> list[list[int]]:
    """The calibration windows in `groups` consecutive groups (at least 2 windows each)."""
    g = max(1, min(int(groups), ids.size // 2))
    return [[int(i) for i in part] for part in np.array_split(ids, g)]


class TokenSampler:
    """Seeded token positions per window: `rows` among the attended positions of each window
    in `windows`, drawn by a generator seeded with (*seed, window id), so that both models
    are sampled at exactly the same tokens."""

    def __init__(self, windows: Container[int], rows: int, seed: Sequence[int]) -> None:
        self._windows = windows
        self._rows = rows
        self._seed = list(seed)
        self._positions: dict[int, np.ndarray] = {}

    def select(self, context: Any) -> tuple[list[int], list[np.ndarray]]:
        """(batch rows of the sampled windows, their positions) in this batch."""
        batch_rows, positions = [], []
        mask = None
        for b, wid in enumerate(context.window_ids.tolist()):
            if wid not in self._windows:
                continue
            if wid not in self._positions:
                if mask is None:
                    mask = context.attention_mask.detach().cpu().numpy()
                attended = np.flatnonzero(mask[b])
                rng = np.random.default_rng([*self._seed, wid])
                take = min(self._rows, attended.size)
                self._positions[wid] = np.sort(rng.choice(attended, size=take, replace=False))
            batch_rows.append(b)
            positions.append(self._positions[wid])
        return batch_rows, positions


def gather(y: torch.Tensor, batch_rows: list[int], positions: list[np.ndarray]) -> np.ndarray:
    """The sampled rows of a [batch, tokens, features] tensor, float32 on the CPU (one
    gather)."""
    sizes = [p.size for p in positions]
    flat = torch.as_tensor(np.repeat(batch_rows, sizes) * y.shape[1] + np.concatenate(positions),
                           device=y.device)
    return y.reshape(-1, y.shape[-1]).index_select(0, flat).to(torch.float32).cpu().numpy()


class RowTap:
    """Observing tap that samples rows per window and reduces each window group's rows."""

    def __init__(self, modules: list[tuple[str, Any]], groups: list[list[int]],
                 rows_per_window: int, seed: int, clock: Probe,
                 factors: Mapping[str, np.ndarray] | None = None) -> None:
        self._modules = modules
        self._factors = dict(factors or {})
        self._group_of = {wid: g for g, ids in enumerate(groups) for wid in ids}
        self._sizes = [len(ids) for ids in groups]
        self._clock = clock
        self._sampler = TokenSampler(self._group_of, rows_per_window, (seed,))
        self._buffers: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._seen: dict[tuple[str, int], int] = {}
        self._reduced: dict[str, dict[int, tuple[list[float | None], int]]] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def modules(self, model: Any) -> list[tuple[str, Any]]:
        return self._modules

    @property
    def balanced(self) -> list[str]:
        """Modules whose outputs are multiplied by their pair's balancing scale."""
        return sorted(self._factors)

    def _select(self, context: Any) -> tuple[list[int], list[np.ndarray], list[int]]:
        batch_rows, positions = self._sampler.select(context)
        groups = [self._group_of[int(context.window_ids[b])] for b in batch_rows]
        return batch_rows, positions, groups

    def observe(self, name: str, output: Any, context: Any) -> None:
        started = time.perf_counter()
        try:
            y = output[0] if isinstance(output, tuple) else output
            if not isinstance(y, torch.Tensor) or y.dim() != 3 or name in self.results:
                return
            rows, positions, groups = self._select(context)
            if not rows:
                return
            # small gathers and products: a busy thread pool costs more than they do
            with single_thread():
                self._keep(name, y, rows, positions, groups)
                self._reduce_complete(name, int(y.shape[-1]))
        finally:
            self._clock.seconds += time.perf_counter() - started

    def _keep(self, name: str, y: torch.Tensor, rows: list[int], positions: list[np.ndarray],
              groups: list[int]) -> None:
        """Buffer the sampled rows of this batch, by window group (one gather)."""
        sizes = [p.size for p in positions]
        n = y.shape[-1]
        picked = gather(y, rows, positions)
        factor = self._factors.get(name)
        if factor is not None and factor.shape == (n,):
            picked = picked * factor[None, :]
        owner = np.repeat(groups, sizes)
        for g in sorted(set(groups)):
            key = (name, g)
            self._buffers.setdefault(key, []).append(picked[owner == g])
            self._seen[key] = self._seen.get(key, 0) + groups.count(g)

    def _reduce_complete(self, name: str, features: int) -> None:
        """Reduce each group of this module whose windows are all in, and drop its rows (so
        at most one group's rows per module wait for later batches); once every group is
        reduced, the module's result is complete."""
        done = self._reduced.setdefault(name, {})
        for g, size in enumerate(self._sizes):
            if g not in done and self._seen.get((name, g), 0) >= size:
                y = np.concatenate(self._buffers.pop((name, g)))
                done[g] = (reduce_rows(y), int(y.shape[0]))
        if len(done) == len(self._sizes):
            del self._reduced[name]
            self.results[name] = {"groups": [done[g][0] for g in range(len(self._sizes))],
                                  "rows": [done[g][1] for g in range(len(self._sizes))],
                                  "features": features}

    def complete(self) -> dict[str, dict[str, Any]]:
        """Modules that saw every calibration window (all of their groups reduced)."""
        return dict(self.results)


class RMTProbe(Probe):
    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        scope = policy.get("scope", "all")
        self.scope = FAMILIES if scope == "all" else tuple(
            [scope] if isinstance(scope, str) else scope)
        self.max_rows = int(policy.get("max_rows", DEFAULT_MAX_ROWS))
        self.groups = int(policy.get("groups", DEFAULT_GROUPS))
        self.cache_settings = {"version": 3, "scope": list(self.scope), "max_rows": self.max_rows,
                               "groups": self.groups}
        self._taps: dict[str, RowTap] = {}
        self._plan: dict[str, Any] = {}

    def _rows_per_window(self) -> int:
        assert self.info is not None
        return max(2, math.ceil(self.max_rows / max(1, self.info.calibration_ids.size)))

    def baseline_loaded(self, model: Any) -> None:
        with single_thread():
            self._plan = transform_plan(model)

    def subject_loaded(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> None:
        self._plan = dict(baseline.get("transforms") or {})  # the baseline's pairs, both models

    def taps(self, model: Any, role: str, phase: str) -> list[Any]:
        if phase != "final" or self.info is None or self.info.calibration_ids.size == 0:
            return []
        modules = linear_modules(model, self.scope)
        tap = RowTap(modules, window_groups(self.info.calibration_ids, self.groups),
                     self._rows_per_window(), self.info.seed, self,
                     balancing_factors(model, modules, self._plan))
        self._taps[role] = tap
        return [tap]

    def baseline_state(self) -> dict[str, Any]:
        tap = self._taps.pop("baseline", None)  # drop its module references: the baseline can go
        return {"modules": tap.complete() if tap else {}, "transforms": self._plan}

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        tap = self._taps.get("subject")
        if ctx.scores.get("final") is None or tap is None:
            return not_measured("the final windows were not evaluated")
        base = baseline.get("modules", {})
        subject = tap.complete()
        modules = []
        for name, subj in subject.items():
            if name not in base or base[name]["rows"] != subj["rows"]:
                continue
            modules.append({"name": name, "family": str(family_of(name)),
                            "features": subj["features"], "rows": subj["rows"],
                            "baseline": base[name]["groups"], "subject": subj["groups"]})
        unmatched = sorted((set(base) ^ set(subject)) | {
            n for n in set(base) & set(subject) if base[n]["rows"] != subject[n]["rows"]})
        ids = self.info.calibration_ids
        common = {"windows": int(ids.size), "window_ids": [int(i) for i in ids],
                  "groups": window_groups(ids, self.groups),
                  "rows_per_window": self._rows_per_window(), "max_rows": self.max_rows,
                  "standardisation": "column-centred, one global scale (median feature sd)",
                  "balanced_outputs": tap.balanced,
                  "unmatched": unmatched}
        if not modules:
            return {**not_measured("no module matched: no linear module in scope was observed "
                                   "in both models"), **common}
        return {"evaluated": True, **common, "modules": modules}
