"""Spectral probe: σ_max of every 2-D weight, baseline vs subject, one model resident.

Baseline (when it is loaded for evaluation): σ_b and the top right singular vector v_b of
every 2-D floating weight (tied weights once), exact SVD for small matrices, otherwise a
seeded block power iteration for a start vector refined by power iteration. Both are cached
with the baseline's results.

Subject: each baseline weight is streamed from the baseline's files (`WeightReader`). An
unchanged weight (bit-identical in the subject's dtype) keeps σ_b; a changed one gets σ_s by
power iteration warm-started from v_b, and the edit size ‖W_s − W_b‖₂/σ_b by a short power
iteration on the difference (a lower bound after `EDIT_SIZE_ITERATIONS` steps; diagnostic).
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from invarlock.families import family_of
from invarlock.guards.measure.probe import Probe, SubjectContext
from invarlock.guards.measure.weights import (
    EXACT_SVD_MAX_ELEMENTS,
    WeightReader,
    power_iteration,
    single_thread,
)
from invarlock.models.effective import EffectiveWeights, named_matrices

log = logging.getLogger(__name__)

EDIT_SIZE_ITERATIONS = 8
BLOCK_VECTORS = 8
BLOCK_ITERATIONS = 4


def matrices(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, tensor) of every 2-D floating weight, tied tensors once, in order."""
    seen: set[tuple] = set()
    out = []
    for name, param in named_matrices(model):  # quantized weights dequantized one at a time
        if param.dim() != 2 or not param.dtype.is_floating_point or param.numel() == 0:
            continue
        key = (str(param.device), param.data_ptr(), tuple(param.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, param))
    return out


def baseline_top(w: torch.Tensor, seed: int) -> tuple[float, torch.Tensor]:
    """σ_max and top right singular vector of a float32 matrix, accurately (computed once)."""
    if w.numel() <= EXACT_SVD_MAX_ELEMENTS:
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        return float(s[0]), vh[0].clone()
    # Block power iteration (subspace iteration, Rutishauser) for a start vector whose
    # convergence depends on σ1/σ9 rather than σ1/σ2, then single-vector refinement.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(w.shape[1], BLOCK_VECTORS, generator=gen).to(w.device)
    for _ in range(BLOCK_ITERATIONS):
        q, _ = torch.linalg.qr(w.T @ (w @ q))
    _, _, vh = torch.linalg.svd(w @ q, full_matrices=False)
    sigma, v, _ = power_iteration(w, q @ vh[0], tol=1e-7, max_iter=200)
    return sigma, v


def encode_vector(v: torch.Tensor) -> str:
    return base64.b64encode(v.detach().cpu().to(torch.float32).numpy().tobytes()).decode()


def decode_vector(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())


class SpectralProbe(Probe):
    cache_settings: ClassVar[dict[str, Any]] = {"version": 1}

    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        self._baseline: list[dict[str, Any]] = []
        self._modules: list[dict[str, Any]] | None = None

    def baseline_loaded(self, model: Any) -> None:
        self._baseline = []
        with torch.inference_mode(), single_thread():
            for i, (name, param) in enumerate(matrices(model)):
                sigma, v = baseline_top(param.detach().to(torch.float32), seed=i)
                self._baseline.append({"name": name, "family": str(family_of(name)),
                                       "shape": list(param.shape), "sigma": sigma,
                                       "vector": encode_vector(v)})

    def baseline_state(self) -> dict[str, Any]:
        return {"modules": self._baseline}

    def subject_loaded(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> None:
        reader = WeightReader(ctx.baseline_files)
        params = EffectiveWeights(ctx.model)  # float view; quantized modules dequantized
        modules = []
        unmatched = []
        with torch.inference_mode(), single_thread():
            for entry in baseline["modules"]:
                name = entry["name"]
                key = reader.resolve(name, ctx.base_model_prefix)
                subject = params.get(name)
                if key is None or subject is None or list(subject.shape) != entry["shape"]:
                    unmatched.append(name)
                    continue
                modules.append(self._one(entry, subject.detach(), reader.get(key)))
        if unmatched:
            log.warning("spectral: %d baseline weight(s) not comparable (first: %s)",
                        len(unmatched), unmatched[0])
        self._modules = modules
        self._unmatched = unmatched

    @staticmethod
    def _one(entry: Mapping[str, Any], subject: torch.Tensor,
             base_raw: torch.Tensor) -> dict[str, Any]:
        base = base_raw.to(device=subject.device, dtype=subject.dtype)
        sigma_b = float(entry["sigma"])
        record = {"name": entry["name"], "family": entry["family"], "shape": entry["shape"],
                  "sigma_baseline": sigma_b, "sigma_subject": sigma_b, "edit_size": 0.0,
                  "changed": False, "iterations": 0}
        if torch.equal(subject, base):
            return record
        start = decode_vector(entry["vector"])
        ws = subject.to(torch.float32)
        sigma_s, _, iters = power_iteration(ws, start, tol=1e-7, max_iter=200)
        diff = ws - base.to(torch.float32)
        edit, _, _ = power_iteration(diff, start, tol=1e-3, max_iter=EDIT_SIZE_ITERATIONS)
        size = edit / sigma_b if sigma_b > 0 else 0.0
        # JSON has no inf/NaN: a norm that is not finite is stored as None
        record.update(sigma_subject=sigma_s if math.isfinite(sigma_s) else None, changed=True,
                      iterations=iters, edit_size=size if math.isfinite(size) else None)
        return record

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        if self._modules is None:
            raise RuntimeError("spectral probe measured before the subject was loaded")
        return {"evaluated": True, "modules": self._modules,
                "unmatched": list(self._unmatched),
                "method": {"exact_svd_max_elements": EXACT_SVD_MAX_ELEMENTS,
                           "power_iteration_tol": 1e-7,
                           "edit_size_iterations": EDIT_SIZE_ITERATIONS}}
