"""VE probe: second moments at block output projections, and the predictive gate's forward.

Taps on the preview passes accumulate Σy² and the element count over attended positions of
each block output projection (attention and FFN outputs before the residual add). After the
subject's evaluation the pure proposal gives α per module; when any α differs from 1 the
subject scores the calibration windows once more with forward hooks that multiply those
modules' outputs by α (removed afterwards; weights untouched).

`write_corrected_copy` folds α into a copy of the subject (W ← αW, b ← αb) and saves it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from invarlock.enums import MetricKind
from invarlock.families import block_index, family_of, is_block_output_projection
from invarlock.guards import variance as pure
from invarlock.guards.base import not_applicable, not_measured
from invarlock.guards.measure.probe import Probe, SubjectContext
from invarlock.models.effective import is_quantized

log = logging.getLogger(__name__)


def output_projections(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """Block output projections (Linear/Conv1D) in model order."""
    out = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        is_linear = is_linear or is_quantized(module)
        if is_linear and block_index(name) is not None and is_block_output_projection(name):
            out.append((name, module))
    return out


class MomentTap:
    """Observing tap: Σy² and element counts over attended positions, per module."""

    def __init__(self, modules: list[tuple[str, Any]], clock: Probe) -> None:
        self._modules = modules
        self._clock = clock
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._context_key: int | None = None
        self._mask: torch.Tensor | None = None
        self._positions = 0

    def modules(self, model: Any) -> list[tuple[str, Any]]:
        return self._modules

    def observe(self, name: str, output: Any, context: Any) -> None:
        started = time.perf_counter()
        try:
            y = output[0] if isinstance(output, tuple) else output
            if not isinstance(y, torch.Tensor) or y.dim() != 3:
                return
            total, positions = self._square_sum(y, context)
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.counts[name] = self.counts.get(name, 0) + positions * int(y.shape[-1])
        finally:
            self._clock.seconds += time.perf_counter() - started

    def _square_sum(self, y: torch.Tensor, context: Any) -> tuple[float, int]:
        """Σy² over attended positions (float32 reduction) and the number of positions."""
        key = id(context)
        if self._context_key != key:  # once per batch: is anything padded?
            mask = context.attention_mask
            self._context_key = key
            self._mask = None if bool(mask.all()) else mask.to(torch.float32)
            self._positions = int(mask.sum())
        if self._mask is None:
            return float(torch.linalg.vector_norm(y, dtype=torch.float32)) ** 2, self._positions
        per_position = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32).square()
        return float((per_position * self._mask.to(y.device)).sum()), self._positions

    def moments(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}


@contextlib.contextmanager
def scaled_outputs(model: torch.nn.Module, scales: Mapping[str, float]) -> Iterator[None]:
    """Multiply the outputs of the named modules by their α for the duration of the block."""
    handles = []
    modules = dict(model.named_modules())

    def scaler(alpha: float) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] * alpha, *output[1:])
            return output * alpha

        return hook

    try:
        for name, alpha in scales.items():
            handles.append(modules[name].register_forward_hook(scaler(float(alpha))))
        yield
    finally:
        for handle in handles:
            handle.remove()


class VarianceProbe(Probe):
    cache_settings: ClassVar[dict[str, Any]] = {"version": 1, "fit": "preview"}

    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        self._taps: dict[str, MomentTap] = {}
        self.scales: dict[str, float] = {}

    def taps(self, model: Any, role: str, phase: str) -> list[Any]:
        if phase != "preview":
            return []
        tap = MomentTap(output_projections(model), self)
        self._taps[role] = tap
        return [tap]

    def baseline_state(self) -> dict[str, Any]:
        tap = self._taps.pop("baseline", None)  # drop its module references: the baseline can go
        return {"moments": tap.moments() if tap else {}}

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        tap = self._taps.get("subject")
        final = ctx.scores.get("final")
        if final is None or tap is None:
            return not_measured("the final windows were not evaluated")
        base = baseline.get("moments", {})
        subj = tap.moments()
        families = pure.tapped_families(self.policy.get("tap", "all"))
        names = [n for n in subj if n in base and str(family_of(n)) in families]
        edited = _edited(ctx, names)
        modules = [{"name": n, "family": str(family_of(n)), "m2_baseline": _finite(base[n]),
                    "m2_subject": _finite(subj[n]), "edited": edited[n]} for n in names]
        unmatched = sorted(n for n in set(subj) ^ set(base) if str(family_of(n)) in families)
        measurements: dict[str, Any] = {"evaluated": True, "fit_windows": "preview",
                                        "tap": sorted(families), "modules": modules,
                                        "unmatched": unmatched, "gate": None}
        alpha = pure.proposal(measurements, self.policy) if modules else np.ones(0)
        self.scales = {m["name"]: float(a) for m, a in zip(modules, alpha, strict=True)
                       if a != 1.0}
        if not self.scales:
            return measurements
        if ctx.info.kind is MetricKind.ACCURACY:
            return {**measurements, **not_applicable(
                "the predictive gate needs per-window log-loss; classifiers report "
                "correctness")}
        gate = self._gate(ctx, final, alpha)
        if not (np.all(np.isfinite(gate["nll_plain"])) and np.all(np.isfinite(
                gate["nll_scaled"]))):
            return {**measurements, **not_measured(
                "non-finite losses on the VE gate's windows")}
        measurements["gate"] = gate
        return measurements

    def _gate(self, ctx: SubjectContext, final: Any, alpha: np.ndarray) -> dict[str, Any]:
        assert ctx.score is not None and ctx.calibration is not None
        k = ctx.calibration.n
        with scaled_outputs(ctx.model, self.scales):
            scaled = ctx.score(ctx.model, ctx.calibration)
        if not np.array_equal(scaled.window_ids, final.window_ids[:k]):
            raise RuntimeError("VE gate windows are not the first calibration windows")
        return {"window_ids": [int(i) for i in scaled.window_ids],
                "tokens": [int(n) for n in final.tokens[:k]],
                "nll_plain": [float(v) for v in final.values[:k]],
                "nll_scaled": [float(v) for v in scaled.values],
                "alpha": [float(a) for a in alpha],
                "replicates": ctx.info.replicates, "seed": ctx.info.bootstrap_seed,
                "ci_alpha": ctx.info.ci_alpha}


def _edited(ctx: SubjectContext, names: list[str]) -> dict[str, bool]:
    """Which output projections' weights differ from the baseline's (streamed from its files);
    `targets: edited_modules_only` restricts the proposal to these."""
    from invarlock.guards.measure.weights import WeightReader, single_thread
    from invarlock.models.effective import effective_weight

    reader = WeightReader(ctx.baseline_files)
    modules = dict(ctx.model.named_modules())
    out = {}
    with torch.inference_mode(), single_thread():
        for name in names:
            weight = effective_weight(modules[name])
            key = reader.resolve(f"{name}.weight", ctx.base_model_prefix, ctx.model)
            base = None if key is None else reader.get(key)
            out[name] = base is None or tuple(base.shape) != tuple(weight.shape) or not (
                torch.equal(weight, base.to(device=weight.device, dtype=weight.dtype)))
    return out


def _finite(x: float | None) -> float | None:
    """JSON has no inf/NaN: a moment that is not finite is stored as None."""
    return None if x is None or not np.isfinite(x) else float(x)


def write_corrected_copy(loaded: Any, scales: Mapping[str, float], out_dir: Path) -> None:
    """Save a copy of the subject with each α folded into its module's weight and bias."""
    from invarlock.models.loading import save_checkpoint

    model = copy.deepcopy(loaded.model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, alpha in scales.items():
            module = modules[name]
            module.weight.mul_(alpha)
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(alpha)
    save_checkpoint(dataclasses.replace(loaded, model=model), out_dir)
    log.info("wrote the VE-corrected subject (%d module(s) rescaled) to %s", len(scales),
             out_dir)
