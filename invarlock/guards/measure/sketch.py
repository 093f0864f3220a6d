"""Input sketches: the directions the baseline's data drives each block linear along.

An edit's size in weight space, ‖ΔW‖₂/σ_b, is large for GPTQ-style error feedback by design:
GPTQ pushes each column's rounding error onto the inputs the data barely uses, so the error
is small where it matters, ‖ΔW·X‖, and large elsewhere (SmolLM2-135M: 1.9 on the module that
carries its massive activations). A permutation or swap of rows is large in both. The
spectral probe therefore also measures the edit along the data,

    ‖ΔW_eff Bᵀ‖_F / ‖W_b,eff Bᵀ‖_F,

the root-mean-square change of the module's output relative to the output itself, over the
sampled inputs, with B [r, in] the baseline's input sketch: the top `SKETCH_RANK` right
singular directions of its sampled input rows X (`SKETCH_ROWS`, taken at seeded token
positions of the calibration windows), scaled by their singular values over √n, so Bᵀ B is
XᵀX/n along them. The Frobenius norm weighs every direction by the data's energy along it (a
spectral norm would be decided by the one direction whose output is smallest: on SmolLM2 it
made 10% magnitude pruning look twice as large). Inputs are taken in the effective matrix's
own coordinates (x divided by `fold.input_scales`), so a norm fold or a balanced rescaling
changes neither side. Modules that read the same input (q/k/v, gate/up) share one sketch.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from invarlock.guards.measure.probe import Probe
from invarlock.guards.measure.rmt import TokenSampler, gather
from invarlock.guards.measure.weights import single_thread

SKETCH_ROWS = 128   # sampled input rows per module over the calibration windows
SKETCH_RANK = 32    # directions kept per input
SALT = 0x5E7C       # the sampled positions differ from RMT's output rows


class InputTap:
    """Observing tap on block linears' *inputs*: keeps the sampled rows of each module on
    the calibration windows, as float32 on the CPU, divided by the module's input scales."""

    observes_inputs = True

    def __init__(self, modules: list[tuple[str, Any]], window_ids: np.ndarray,
                 rows_per_window: int, seed: int, clock: Probe,
                 scales: Mapping[str, np.ndarray],
                 readers: Mapping[str, str] | None = None) -> None:
        self._modules = modules
        self._sampler = TokenSampler({int(w) for w in window_ids}, rows_per_window,
                                     (seed, SALT))
        self._clock = clock
        self._scales = dict(scales)
        # modules that read one norm's output with the same scales (q/k/v, gate/up) share
        # their rows: `readers` maps a module to the norm it reads (`fold.trace_norm_inputs`)
        self._shared = {
            name: (norm, hashlib.sha256(np.ascontiguousarray(
                self._scales[name]).tobytes()).hexdigest() if name in self._scales else "")
            for name, norm in (readers or {}).items()}
        self._batch: tuple[Any, dict[tuple, np.ndarray]] = (None, {})
        self.rows: dict[str, list[np.ndarray]] = {}

    def modules(self, model: Any) -> list[tuple[str, Any]]:
        return self._modules

    def observe(self, name: str, x: Any, context: Any) -> None:
        started = time.perf_counter()
        try:
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                return
            batch, positions = self._sampler.select(context)
            if not batch:
                return
            if self._batch[0] is not context:
                self._batch = (context, {})
            key = self._shared.get(name)
            shared = None if key is None else self._batch[1].get(key)
            if shared is not None:  # one copy in memory, one sketch later
                self.rows.setdefault(name, []).append(shared)
                return
            with single_thread():
                picked = gather(x, batch, positions)
                scale = self._scales.get(name)
                if scale is not None and scale.shape == (picked.shape[1],):
                    with np.errstate(divide="ignore", invalid="ignore"):
                        picked = np.where(scale != 0, picked / scale, 0.0).astype(np.float32)
                self.rows.setdefault(name, []).append(picked)
                if key is not None:
                    self._batch[1][key] = picked
        finally:
            self._clock.seconds += time.perf_counter() - started


def sketch(rows: np.ndarray, rank: int = SKETCH_RANK) -> np.ndarray:
    """B [r, in], float32: the top right singular directions of the rows times their
    singular values over √n (Bᵀ B = XᵀX / n along them), as U_rᵀ X / √n from the small
    n × n Gram matrix X Xᵀ = U S² Uᵀ (n rows ≪ in features). Rows that are not finite are
    left out: they carry no direction."""
    x = rows[np.isfinite(rows).all(axis=1)].astype(np.float64)
    if x.shape[0] == 0:
        return np.zeros((0, rows.shape[1]), dtype=np.float32)
    eigenvalues, u = np.linalg.eigh(x @ x.T)
    order = np.argsort(eigenvalues)[::-1]
    top = eigenvalues[order[0]]
    r = min(rank, int(np.count_nonzero(eigenvalues > top * 1e-14))) if top > 0 else 0
    return (u[:, order[:r]].T @ x / math.sqrt(x.shape[0])).astype(np.float32)


def encode(b: np.ndarray) -> dict[str, Any]:
    """A sketch as JSON: float16 bytes in base64 and the shape (what the cache keeps). The
    edit along the data is a ratio, so B is stored divided by its largest |value|: float16
    then neither overflows nor loses the small directions' precision to a large one."""
    peak = float(np.abs(b).max()) if b.size else 0.0
    b = b / peak if peak > 0 and math.isfinite(peak) else b
    data = np.ascontiguousarray(b, dtype=np.float16).tobytes()
    return {"shape": list(b.shape), "float16": base64.b64encode(data).decode()}


def decode(entry: Mapping[str, Any]) -> torch.Tensor:
    shape = tuple(int(n) for n in entry["shape"])
    data = np.frombuffer(base64.b64decode(entry["float16"]), dtype=np.float16)
    if data.size != math.prod(shape):
        raise ValueError(f"input sketch of {data.size} values, shape {shape}")
    return torch.from_numpy(data.astype(np.float32).reshape(shape))


def sketches(rows: Mapping[str, list[np.ndarray]]) -> tuple[list[dict[str, Any]],
                                                           dict[str, int]]:
    """(distinct sketches, {module: index}): modules whose sampled inputs are identical (one
    tensor read by q, k and v) share one."""
    table: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    seen: dict[str, int] = {}
    same_parts: dict[tuple[int, ...], int] = {}  # rows the tap kept once for several modules
    for name, parts in rows.items():
        ids = tuple(id(p) for p in parts)
        if ids in same_parts:
            index[name] = same_parts[ids]
            continue
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
        if digest not in seen:
            seen[digest] = len(table)
            table.append(encode(sketch(x)))
        index[name] = same_parts[ids] = seen[digest]
        del x
    return table, index


def edit_along_data(delta: torch.Tensor, base: torch.Tensor, b: torch.Tensor) -> float | None:
    """‖ΔW Bᵀ‖_F / ‖W_b Bᵀ‖_F for [out, in] matrices; None where the baseline's output along
    the sketch is zero (nothing to compare with)."""
    b = b.to(device=base.device, dtype=torch.float32)
    if b.shape[0] == 0 or b.shape[1] != base.shape[1]:
        return None
    denominator = float(torch.linalg.matrix_norm(base @ b.T))
    if not denominator > 0:
        return None
    value = float(torch.linalg.matrix_norm(delta @ b.T)) / denominator
    return value if math.isfinite(value) else None
