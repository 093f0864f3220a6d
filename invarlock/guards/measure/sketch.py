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

The same sketch, with each input channel's mean square (`energy`), gives the module's gain
along the data (`data_matrix`): σ_max of W_eff·C̃^½, where C̃ = BᵀB + diag(d²) is the
sampled inputs' second moment kept to its top directions plus, per channel, the energy
those directions leave out (d² = diag(XᵀX/n) − diag(BᵀB)). An edit that moves W only where
the data never goes (GPTQ's error feedback into input channels the text barely drives)
leaves it unchanged; a change of the gain on any input the data does drive moves it.

The sampled rows wait in anonymous memory maps (`RowStore`), not on the heap: kept between
the batches' freed activations, small heap arrays fragmented it (on SmolLM2-135M the
baseline's tapped pass grew the process by 200-500 MB of free but unusable heap).
"""

from __future__ import annotations

import base64
import hashlib
import math
import mmap
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


class RowStore:
    """One input's sampled rows, float32, in an anonymous memory map sized for every row the
    sampler can take (grown by doubling should a batch be seen twice)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, int(capacity))
        self._data: np.ndarray | None = None
        self.filled = 0
        self.last_batch: Any = None  # the batch context whose rows were added last

    @staticmethod
    def _mapped(rows: int, features: int) -> np.ndarray:
        size = max(1, rows * features) * 4
        return np.frombuffer(mmap.mmap(-1, size), dtype=np.float32,
                             count=rows * features).reshape(rows, features)

    def add(self, rows: np.ndarray) -> None:
        n, features = rows.shape
        if self._data is None:
            self._data = self._mapped(max(self._capacity, n), features)
        elif self.filled + n > self._data.shape[0]:
            grown = self._mapped(max(2 * self._data.shape[0], self.filled + n), features)
            grown[:self.filled] = self._data[:self.filled]
            self._data = grown
        self._data[self.filled:self.filled + n] = rows
        self.filled += n

    def array(self) -> np.ndarray:
        """The rows added so far (a view of the map)."""
        if self._data is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._data[:self.filled]


class InputTap:
    """Observing tap on block linears' *inputs*: keeps the sampled rows of each module on
    the calibration windows, as float32 on the CPU, divided by the module's input scales."""

    observes_inputs = True

    def __init__(self, modules: list[tuple[str, Any]], window_ids: np.ndarray,
                 rows_per_window: int, seed: int, clock: Probe,
                 scales: Mapping[str, np.ndarray],
                 readers: Mapping[str, str] | None = None) -> None:
        self._modules = modules
        windows = {int(w) for w in window_ids}
        self._sampler = TokenSampler(windows, rows_per_window, (seed, SALT))
        self._capacity = rows_per_window * len(windows)
        self._clock = clock
        self._scales = dict(scales)
        # modules that read one norm's output with the same scales (q/k/v, gate/up) share
        # their rows: `readers` maps a module to the norm it reads (`fold.trace_norm_inputs`)
        self._shared = {
            name: (norm, hashlib.sha256(np.ascontiguousarray(
                self._scales[name]).tobytes()).hexdigest() if name in self._scales else "")
            for name, norm in (readers or {}).items()}
        self._stores: dict[Any, RowStore] = {}
        self.rows: dict[str, RowStore] = {}

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
            key = self._shared.get(name, ("module", name))
            store = self.rows.get(name)
            if store is None:
                store = self._stores.setdefault(key, RowStore(self._capacity))
                self.rows[name] = store
            if store.last_batch is context:  # one copy in memory, one sketch later
                return
            with single_thread():
                picked = gather(x, batch, positions)
                scale = self._scales.get(name)
                if scale is not None and scale.shape == (picked.shape[1],):
                    with np.errstate(divide="ignore", invalid="ignore"):
                        picked = np.where(scale != 0, picked / scale, 0.0).astype(np.float32)
                store.add(picked)
                store.last_batch = context
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


def energy(rows: np.ndarray) -> np.ndarray:
    """diag(XᵀX/n) [in], float32: each input channel's mean square over the finite rows."""
    x = rows[np.isfinite(rows).all(axis=1)].astype(np.float64)
    if x.shape[0] == 0:
        return np.zeros(rows.shape[1], dtype=np.float32)
    return np.mean(x * x, axis=0).astype(np.float32)


def encode(b: np.ndarray, channel_energy: np.ndarray | None = None) -> dict[str, Any]:
    """A sketch as JSON: float16 bytes in base64 and the shape (what the cache keeps). The
    edit along the data is a ratio, so B is stored divided by its largest |value|: float16
    then neither overflows nor loses the small directions' precision to a large one. The
    channels' energy, divided by the same peak squared, is kept as float32 (it spans many
    orders of magnitude)."""
    peak = float(np.abs(b).max()) if b.size else 0.0
    scaled = peak > 0 and math.isfinite(peak)
    b = b / peak if scaled else b
    data = np.ascontiguousarray(b, dtype=np.float16).tobytes()
    entry = {"shape": list(b.shape), "float16": base64.b64encode(data).decode()}
    if channel_energy is not None:
        e = channel_energy / peak**2 if scaled else channel_energy
        entry["energy"] = base64.b64encode(
            np.ascontiguousarray(e, dtype=np.float32).tobytes()).decode()
    return entry


def decode(entry: Mapping[str, Any]) -> torch.Tensor:
    shape = tuple(int(n) for n in entry["shape"])
    data = np.frombuffer(base64.b64decode(entry["float16"]), dtype=np.float16)
    if data.size != math.prod(shape):
        raise ValueError(f"input sketch of {data.size} values, shape {shape}")
    return torch.from_numpy(data.astype(np.float32).reshape(shape))


def decode_energy(entry: Mapping[str, Any]) -> torch.Tensor | None:
    """The channels' energy on the decoded sketch's scale; None where the entry has none."""
    if "energy" not in entry:
        return None
    data = np.frombuffer(base64.b64decode(entry["energy"]), dtype=np.float32)
    width = int(entry["shape"][1])
    if data.size != width:
        raise ValueError(f"channel energy of {data.size} values for {width} inputs")
    if not np.isfinite(data).all() or (data < 0).any():
        raise ValueError("channel energy not finite and non-negative")
    return torch.from_numpy(data.copy())


def residual_scales(b: torch.Tensor, channel_energy: torch.Tensor) -> torch.Tensor:
    """d [in]: per channel, the root of the energy the sketch's directions leave out."""
    kept = (b.to(torch.float32) ** 2).sum(dim=0)
    return (channel_energy.to(torch.float32) - kept).clamp_min(0.0).sqrt()


def data_matrix(w: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """[W Bᵀ | W·diag(d)] [out, r + in]: its Gram matrix M Mᵀ = W (BᵀB + diag(d²)) Wᵀ, so its
    σ_max is the gain of W_eff along the data's second moment C̃ (module docstring)."""
    w = w.to(torch.float32)
    b = b.to(device=w.device, dtype=torch.float32)
    return torch.cat([w @ b.T, w * d.to(device=w.device, dtype=torch.float32)], dim=1)


class DataMatrix:
    """`data_matrix(w, b, d)` known by its products (`weights.RowProducts`), never formed:
    q Mᵀ = (q_r B + q_d·d) Wᵀ and z M = [(z W) Bᵀ | (z W)·d], two passes over W per step,
    where forming M reads W three times and writes a copy of it."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> None:
        self.w = w.to(torch.float32)
        self.b = b.to(device=self.w.device, dtype=torch.float32)
        self.d = d.to(device=self.w.device, dtype=torch.float32)
        self.rank = int(self.b.shape[0])
        self.shape = (int(self.w.shape[0]), self.rank + int(self.w.shape[1]))
        self.device = self.w.device

    def inputs(self, q: torch.Tensor) -> torch.Tensor:
        """The input-space rows [k, in] that rows q [k, r + in] of the data's space are."""
        return q[:, :self.rank] @ self.b + q[:, self.rank:] * self.d

    def by_transpose(self, q: torch.Tensor) -> torch.Tensor:
        return self.inputs(q) @ self.w.T

    def by(self, z: torch.Tensor) -> torch.Tensor:
        y = z @ self.w
        return torch.cat([y @ self.b.T, y * self.d], dim=1)

    def dense(self) -> torch.Tensor:
        return data_matrix(self.w, self.b, self.d)


def sketches(rows: Mapping[str, RowStore]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(distinct sketches, {module: index}): modules whose sampled inputs are identical (one
    tensor read by q, k and v, kept once) share one."""
    table: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    seen: dict[str, int] = {}
    of_store: dict[int, int] = {}  # rows the tap kept once for several modules
    for name, store in rows.items():
        if id(store) in of_store:
            index[name] = of_store[id(store)]
            continue
        x = store.array()
        digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
        if digest not in seen:
            seen[digest] = len(table)
            table.append(encode(sketch(x), energy(x)))
        index[name] = of_store[id(store)] = seen[digest]
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
