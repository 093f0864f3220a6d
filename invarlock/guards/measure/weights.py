"""Weights on disk, one tensor at a time, and the largest singular value the guards use.

`WeightReader` streams the baseline's tensors from its checkpoint files (safetensors through
`safe_open`, each tensor read with pread into its own buffer; vetted pickles through torch's
weights-only loader with mmap), so the baseline never has to be resident next to the subject:
a memory map would keep every page read resident in this process until closed, the whole
baseline file next to the subject by the end of the walk.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Exact SVD up to this many elements (512 x 512: ~15 ms on one core); beyond, a randomized
# block power iteration with a residual check (`top_singular`).
EXACT_SVD_MAX_ELEMENTS = 1 << 18
# Random start vectors next to the warm start: with them a direction the warm start is
# orthogonal to (a rank-1 spike away from the baseline's top vectors) is still found.
RANDOM_STARTS = 2
# Stated tolerance of the iterative σ: the block stops early once the top Ritz pair has
# ‖Wᵀu − σv‖ <= RESIDUAL_TOL·σ (σ then lies within RESIDUAL_TOL·σ of a singular value of W);
# every returned pair carries its residual, recorded per module.
RESIDUAL_TOL = 1e-3
# Iterations the block runs at least: the random starts' components along a new dominant
# direction grow by (σ_new/σ_old)² per step and need a few steps to show in the Ritz value.
MIN_ITERATIONS = 3
# Block steps at most; then the top Ritz vector is refined alone (one product pair per step
# instead of k): the block finds the dominant direction, a single vector converges on it.
BLOCK_ITERATIONS = 8
# From this many elements, a matrix's products are worth the thread pool (2 MiB in float32).
THREADED_MIN_ELEMENTS = 1 << 19


class WeightReader:
    """Read named tensors from a checkpoint's weight files without loading the model."""

    def __init__(self, files: Iterable[Path]) -> None:
        self._where: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._renamed: dict[str, str] | None = None
        for path in files:
            path = Path(path)
            if path.name.endswith(".index.json"):
                continue
            if path.suffix == ".gguf":
                from invarlock.models.gguf_file import GGUFTensors

                handle = GGUFTensors(path)  # dequantized one tensor at a time
                self._handles.append(handle)
                for key in handle.keys():  # noqa: SIM118 - not a mapping
                    self._where[key] = handle
            elif path.suffix == ".safetensors":
                from safetensors import safe_open

                try:  # pread: only the tensor being read is resident (safetensors >= 0.6)
                    handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
                except TypeError:
                    handle = safe_open(str(path), framework="pt", device="cpu")
                self._handles.append(handle)
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    self._where[key] = handle
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self._handles.append(state)
                for key in state:
                    self._where[key] = state

    def keys(self) -> set[str]:
        return set(self._where)

    def resolve(self, name: str, prefix: str = "", model: Any = None) -> str | None:
        """The file key of a model parameter name (checkpoints may omit the base prefix;
        with `model`, keys that transformers renames on load are found too, e.g.
        GPT-NeoX's `embed_out` read as `lm_head`)."""
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
        for key in candidates:
            if key in self._where:
                return key
        if model is None:
            return None
        if self._renamed is None:
            self._renamed = load_renames(model, self._where)
        for key in candidates:
            if key in self._renamed:
                return self._renamed[key]
        return None

    def get(self, key: str) -> torch.Tensor:
        source = self._where[key]
        if isinstance(source, dict):
            return source[key]
        return source.get_tensor(key)


def paired_getters(reader: WeightReader, params: Any, prefix: str, model: Any
                   ) -> tuple[Callable[[str], torch.Tensor], Callable[[str], torch.Tensor]]:
    """(baseline, subject) tensor getters by the subject's parameter name: the baseline read
    from its files in the subject's dtype (as it was when the baseline was measured), the
    subject from `params` (its effective weights). A name the baseline lacks is a KeyError."""
    def base_get(name: str) -> torch.Tensor:
        key = reader.resolve(name, prefix, model)
        if key is None:
            raise KeyError(name)
        return reader.get(key).to(params[name].dtype if name in params else None)

    def subject_get(name: str) -> torch.Tensor:
        return params[name].detach()

    return base_get, subject_get


def load_renames(model: Any, keys: Iterable[str]) -> dict[str, str]:
    """{name after loading: file key} for the file keys that the model's transformers
    conversion mapping renames one to one on load (fused conversions are left out)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [t for t in get_model_conversion_mapping(model)
                     if isinstance(t, WeightRenaming)]
    except Exception:  # not a transformers model, or a transformers without the mapping
        return {}
    out: dict[str, str] = {}
    for key in keys:
        new = key
        try:
            for t in renamings:
                new, _ = t.rename_source_key(new)
        except Exception:
            continue
        if new != key:
            out.setdefault(new, key)
    return out


_replaced_threads: list[int] = []  # the counts single_thread blocks replaced, outermost first


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (restored afterwards).

    The spectral work is matrix-vector products (memory-bound) and small decompositions,
    which gain little from more threads; on a busy machine, waking a thread pool for each
    small LAPACK call costs far more than the call itself (``threads_for`` makes the
    exception for large matrices).
    """
    before = torch.get_num_threads()
    _replaced_threads.append(before)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _replaced_threads.pop()
        torch.set_num_threads(before)


@contextlib.contextmanager
def threads_for(w: torch.Tensor) -> Iterator[None]:
    """Inside a ``single_thread`` block, the thread pool back for a matrix large enough to
    use it: products over a few MiB of weights run ~1.4x faster on two threads, where small
    ones lose more to waking the pool than they gain."""
    pool = _replaced_threads[0] if _replaced_threads else 1
    if pool <= 1 or w.device.type != "cpu" or w.numel() < THREADED_MIN_ELEMENTS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(pool)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def power_iteration(w: torch.Tensor, start: torch.Tensor | None = None, *, tol: float = 1e-7,
                    max_iter: int = 300) -> tuple[float, torch.Tensor, int]:
    """Power iteration for σ_max(W) (von Mises): v ← WᵀWv/‖WᵀWv‖, σ = ‖Wv‖."""
    n = w.shape[1]
    if start is None:
        gen = torch.Generator(device="cpu").manual_seed(n)
        v = torch.randn(n, generator=gen, dtype=torch.float32).to(w.device)
    else:
        v = start.to(device=w.device, dtype=torch.float32)
    v = v / v.norm().clamp_min(1e-30)
    sigma = 0.0
    for i in range(1, max_iter + 1):
        u = w @ v
        new_sigma = float(u.norm())
        if new_sigma == 0.0:
            return 0.0, v, i
        v = w.T @ (u / new_sigma)
        v = v / v.norm().clamp_min(1e-30)
        if abs(new_sigma - sigma) <= tol * new_sigma:
            return new_sigma, v, i
        sigma = new_sigma
    return sigma, v, max_iter


@dataclass(frozen=True)
class TopSingular:
    """σ_max of a matrix, its right singular vector, and how it was obtained."""

    sigma: float
    vector: torch.Tensor  # float32 [n], unit norm
    iterations: int       # 0: exact SVD
    residual: float       # ‖Wᵀu − σv‖/σ of the returned pair (0 for the exact SVD)

    @property
    def exact(self) -> bool:
        return self.iterations == 0


def top_singular(w: torch.Tensor, start: torch.Tensor | None = None, *, seed: int = 0,
                 tol: float = 1e-7, residual_tol: float = RESIDUAL_TOL, max_iter: int = 200,
                 random_starts: int = RANDOM_STARTS,
                 exact_max_elements: int = EXACT_SVD_MAX_ELEMENTS) -> TopSingular:
    """σ_max(W): exact SVD up to `exact_max_elements`, else block power iteration.

    The iterative path (subspace iteration, Rutishauser 1970, with a Rayleigh–Ritz step)
    starts from `start` ([n] or [n, j]: the baseline's top vector, a few steps when σ barely
    moved, and the top vector of the edit W_s − W_b) plus `random_starts` seeded Gaussian
    vectors, so that a new dominant direction orthogonal to `start` is found too. After at
    least `MIN_ITERATIONS` it stops when the top Ritz value changes by at most `tol` and its
    residual ‖Wᵀu − σv‖/σ is at most `residual_tol`; after `BLOCK_ITERATIONS` the top Ritz
    vector is refined by single-vector power iteration to `tol`, and its residual is
    recorded. The Ritz value never exceeds σ_max.
    """
    w = w.to(torch.float32)
    m, n = w.shape
    if w.numel() <= exact_max_elements or min(m, n) <= random_starts + 3:
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        if s.numel() == 0:
            return TopSingular(0.0, torch.zeros(n, device=w.device), 0, 0.0)
        return TopSingular(float(s[0]), vh[0].clone(), 0, 0.0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    block = [torch.randn(n, random_starts, generator=gen)]
    if start is not None:
        block.insert(0, start.detach().to("cpu", torch.float32).reshape(n, -1))
    q, _ = torch.linalg.qr(torch.cat(block, dim=1).to(w.device))
    sigma, prev, residual = 0.0, -1.0, float("inf")
    v = q[:, 0]
    for i in range(1, min(max_iter, BLOCK_ITERATIONS) + 1):
        z = w @ q                                       # [m, k]
        y = w.T @ z                                     # [n, k]: the next block, and Wᵀu
        evals, evecs = torch.linalg.eigh(z.T @ z)       # Rayleigh–Ritz on the k×k Gram
        top = evecs[:, -1]
        sigma = float(evals[-1].clamp_min(0).sqrt())
        if sigma == 0.0:
            return TopSingular(0.0, v, i, 0.0)
        v = q @ top
        if i >= MIN_ITERATIONS and abs(sigma - prev) <= tol * sigma:
            # u = Wv/σ, so Wᵀu = (WᵀW Q)·top/σ: the residual costs no product
            residual = float((y @ top / sigma - sigma * v).norm()) / sigma
            if residual <= residual_tol:
                return TopSingular(sigma, v, i, residual)
        prev = sigma
        q, _ = torch.linalg.qr(y)
    steps = min(max_iter, BLOCK_ITERATIONS)
    if max_iter > steps:
        sigma, v, more = power_iteration(w, v, tol=tol, max_iter=max_iter - steps)
        steps += more
    if sigma == 0.0:
        return TopSingular(0.0, v, steps, 0.0)
    residual = float((w.T @ (w @ v) / sigma - sigma * v).norm()) / sigma
    if residual > residual_tol:
        log.debug("top_singular: residual %.2e after %d iterations", residual, steps)
    return TopSingular(sigma, v, steps, residual)
