"""Weights on disk, one tensor at a time, and the largest singular value the guards use.

`WeightReader` streams the baseline's tensors from its checkpoint files (safetensors through
`safe_open`, each tensor read with pread into its own buffer; vetted pickles through torch's
weights-only loader with mmap), so the baseline never has to be resident next to the subject:
a memory map would keep every page read resident in this process until closed, the whole
baseline file next to the subject by the end of the walk.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from invarlock.host_memory import trim_host_memory

log = logging.getLogger(__name__)

# Exact (`exact_top`) up to this many elements (512 x 512: ~25 ms on one core); beyond, a
# randomized block power iteration with a residual check (`top_singular`).
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
# Threads for per-matrix work on the CPU (`matrix_workers`): the products are memory-bound,
# so a few threads use the bandwidth a single one leaves idle, and more only contend.
MAX_MATRIX_WORKERS = 4
# Matrices between hand-backs of the heap's free pages (`invarlock.host_memory`).
TRIM_EVERY = 32
# A plain tensor this large (64 MiB in float32: an embedding, an untied head) is compared by
# row blocks of ROW_BLOCK_ELEMENTS read from the files, never whole beside its difference.
ROW_BLOCKS_MIN_ELEMENTS = 1 << 24
ROW_BLOCK_ELEMENTS = 1 << 20

T = TypeVar("T")
R = TypeVar("R")


class WeightReader:
    """Read named tensors from a checkpoint's weight files without loading the model."""

    def __init__(self, files: Iterable[Path]) -> None:
        self._where: dict[str, Any] = {}
        self._files: dict[str, Path] = {}  # safetensors: row blocks are read from the file
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
                    self._files[key] = path
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

    def large_rows(self, name: str, shape: tuple[int, ...], prefix: str = "",
                   model: Any = None) -> Callable[[int, int], torch.Tensor] | None:
        """rows(lo, hi) of the baseline tensor behind model parameter `name`, where it is
        2-D, `ROW_BLOCKS_MIN_ELEMENTS` or larger, of `shape`, and its file gives row blocks
        (None otherwise: read it whole). A name the files lack is a KeyError."""
        if len(shape) != 2 or math.prod(shape) < ROW_BLOCKS_MIN_ELEMENTS:
            return None
        key = self.resolve(name, prefix, model)
        if key is None:
            raise KeyError(name)
        found = self.row_reader(key)
        return found[0] if found is not None and found[1] == tuple(shape) else None

    def row_reader(self, key: str) -> tuple[Callable[[int, int], torch.Tensor],
                                            tuple[int, ...]] | None:
        """(rows(lo, hi), shape) of a tensor whose row blocks are read without the rest;
        None where the file format gives a tensor only whole (GGUF, dequantized a tensor
        at a time)."""
        source = self._where[key]
        if isinstance(source, dict):
            whole = source[key]  # mapped from the file: a slice reads only its pages
            return (lambda lo, hi: whole[lo:hi]), tuple(whole.shape)
        if key in self._files:
            return safetensors_rows(self._files[key], key)
        return None


# safetensors' dtype names (the format's header) as torch dtypes
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def safetensors_rows(path: Path, key: str) -> tuple[Callable[[int, int], torch.Tensor],
                                                    tuple[int, ...]] | None:
    """(rows(lo, hi), shape) of a tensor in a safetensors file, each block read from the
    file with one positioned read (a row-major tensor's rows are contiguous bytes); None
    for a dtype or layout this does not read (the whole tensor is read instead)."""
    import os

    from invarlock.safetensors_header import read_header

    try:
        header, data_start = read_header(path)
        entry = header.get(key)
        if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
            return None
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry.get("shape") or ())
        begin, end = (int(n) for n in entry["data_offsets"])
        size = path.stat().st_size
    except (OSError, ValueError, TypeError, KeyError):
        return None
    item = torch.empty((), dtype=dtype).element_size()
    if len(shape) != 2 or not 0 <= begin <= end or data_start + end > size or \
            end - begin != shape[0] * shape[1] * item:
        return None
    row_bytes, data = shape[1] * item, data_start + begin

    def rows(lo: int, hi: int) -> torch.Tensor:
        if not 0 <= lo <= hi <= shape[0]:
            raise IndexError(f"rows [{lo}, {hi}) of {key} {list(shape)}")
        if hi == lo:
            return torch.empty((0, shape[1]), dtype=dtype)
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = bytearray(os.pread(fd, (hi - lo) * row_bytes, data + lo * row_bytes))
        finally:
            os.close(fd)
        if len(raw) != (hi - lo) * row_bytes:
            raise OSError(f"{path}: short read of {key}")
        return torch.frombuffer(raw, dtype=dtype).reshape(hi - lo, shape[1])

    return rows, shape


def row_blocks(read: Callable[[int, int], torch.Tensor], rows: int, columns: int
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(lo, hi, rows lo..hi) of a tensor read `ROW_BLOCK_ELEMENTS` at a time."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, columns))
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        yield lo, hi, read(lo, hi)


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


@functools.cache
def _blas_pools() -> Any:
    """The BLAS libraries loaded in this process (numpy's OpenBLAS among them; found on
    first use), or None."""
    try:
        from threadpoolctl import ThreadpoolController

        return ThreadpoolController().select(user_api="blas")
    except Exception:  # threadpoolctl missing or unable to inspect this process
        return None


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch, and numpy's BLAS, on one thread inside the block (restored afterwards).

    The guards' work is matrix-vector products (memory-bound) and small decompositions,
    which gain little from more threads; on a busy machine, waking a thread pool for each
    small LAPACK call costs far more than the call itself (``threads_for`` makes the
    exception for large matrices). numpy's OpenBLAS keeps a pool of its own: right after a
    forward pass, with torch's OpenMP workers still spinning, its threads make a 64 × 64
    eigendecomposition take 2 ms instead of 0.2.
    """
    before = torch.get_num_threads()
    _replaced_threads.append(before)
    torch.set_num_threads(1)
    pools = _blas_pools()
    try:
        with pools.limit(limits=1) if pools is not None else contextlib.nullcontext():
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


def matrix_workers(device: str | torch.device) -> int:
    """Threads for per-matrix work inside a ``single_thread`` block: the torch thread pool
    that block replaced (the user's OMP_NUM_THREADS or the cores), at most
    `MAX_MATRIX_WORKERS`; one on an accelerator, which queues its kernels anyway."""
    if torch.device(device).type != "cpu":
        return 1
    pool = _replaced_threads[0] if _replaced_threads else torch.get_num_threads()
    return max(1, min(pool, MAX_MATRIX_WORKERS))


def map_matrices(fn: Callable[[T], R], items: Iterable[T], workers: int,
                 matrix_of: Callable[[T], torch.Tensor]) -> list[R]:
    """[fn(item) for item in items], the calls on `workers` threads (torch and BLAS on one
    thread each: call inside ``single_thread``), results in order.

    One matrix per thread: the products of a matrix are too small to split well, while
    matrices are independent, and torch releases the GIL in its kernels. The items are formed
    on the calling thread (reading weights from files stays there), at most `workers` ahead
    of the results, so memory holds a bounded number of them. With one worker, each call
    runs on the calling thread with the thread pool back for a large matrix
    (``threads_for(matrix_of(item))``)."""
    if workers <= 1:
        out = []
        for item in items:
            with threads_for(matrix_of(item)):
                out.append(fn(item))
            _settle(len(out))
        return out

    def call(item: T) -> R:
        with torch.inference_mode():  # thread-local: each worker enters it
            return fn(item)

    out: list[R] = []
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="invarlock-matrix") as pool:
        try:
            for item in items:
                while len(pending) >= workers:
                    out.append(pending.popleft().result())
                    _settle(len(out))
                pending.append(pool.submit(call, item))
            while pending:
                out.append(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()
    return out


def _settle(done: int) -> None:
    """Every `TRIM_EVERY` matrices, hand the heap's free pages back (`host_memory`)."""
    if done % TRIM_EVERY == 0:
        trim_host_memory()


class RowProducts(Protocol):
    """A matrix known by its products with a few rows, never formed whole (`top_singular`):
    where it is a product of a stored matrix and a thin one, forming it costs more passes over
    the stored matrix than the iteration itself."""

    shape: tuple[int, int]
    device: torch.device

    def by_transpose(self, q: torch.Tensor) -> torch.Tensor:
        """q Wᵀ for rows q [k, n]: [k, m]."""

    def by(self, z: torch.Tensor) -> torch.Tensor:
        """z W for rows z [k, m]: [k, n]."""

    def dense(self) -> torch.Tensor:
        """W itself, float32 (for the exact path)."""


Matrix = torch.Tensor | RowProducts


def _products(w: Matrix) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                  Callable[[torch.Tensor], torch.Tensor]]:
    """(q ↦ q Wᵀ, z ↦ z W) on blocks of rows."""
    if isinstance(w, torch.Tensor):
        return (lambda q: q @ w.T), (lambda z: z @ w)
    return w.by_transpose, w.by


def power_iteration(w: Matrix, start: torch.Tensor | None = None, *, tol: float = 1e-7,
                    max_iter: int = 300) -> tuple[float, torch.Tensor, int]:
    """Power iteration for σ_max(W) (von Mises): v ← WᵀWv/‖WᵀWv‖, σ = ‖Wv‖."""
    if isinstance(w, torch.Tensor):
        forward, backward = (lambda v: w @ v), (lambda u: w.T @ u)
    else:
        rows_t, rows = _products(w)
        forward, backward = (lambda v: rows_t(v[None])[0]), (lambda u: rows(u[None])[0])
    device = w.device
    n = w.shape[1]
    if start is None:
        gen = torch.Generator(device="cpu").manual_seed(n)
        v = torch.randn(n, generator=gen, dtype=torch.float32).to(device)
    else:
        v = start.to(device=device, dtype=torch.float32)
    v = v / v.norm().clamp_min(1e-30)
    sigma = 0.0
    for i in range(1, max_iter + 1):
        u = forward(v)
        new_sigma = float(u.norm())
        if new_sigma == 0.0:
            return 0.0, v, i
        v = backward(u / new_sigma)
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
    iterations: int       # 0: exact (`exact_top`)
    residual: float       # ‖Wᵀu − σv‖/σ of the returned pair (0 when exact)

    @property
    def exact(self) -> bool:
        return self.iterations == 0


def exact_top(w: torch.Tensor) -> TopSingular:
    """σ_max and the top right singular vector of a float32 matrix, exactly: the top
    eigenvector of the smaller Gram matrix (WᵀW or WWᵀ; 2-4x faster than an SVD), mapped to
    the right side, and σ = ‖Wv‖. σ is a Rayleigh quotient, so it is as accurate as the
    products even where a float32 Gram matrix blurs the vector (an error δ in v moves σ by
    δ²σ); where the top is degenerate, any vector of the top space is a top vector."""
    m, n = w.shape
    if m == 0 or n == 0:
        return TopSingular(0.0, torch.zeros(n, device=w.device), 0, 0.0)
    if not bool(torch.isfinite(w).all()):  # no decomposition: the norm is not finite
        return TopSingular(math.inf, torch.zeros(n, device=w.device), 0, math.inf)
    if n <= m:
        v = torch.linalg.eigh(w.T @ w)[1][:, -1]
    else:
        v = w.T @ torch.linalg.eigh(w @ w.T)[1][:, -1]
    norm = float(v.norm())
    if not norm > 0:  # W = 0: σ is 0 and every unit vector is a top vector
        v = torch.zeros(n, device=w.device)
        v[0] = 1.0
        return TopSingular(0.0, v, 0, 0.0)
    v = v / norm
    return TopSingular(float(torch.linalg.vector_norm(w @ v)), v, 0, 0.0)


def top_singular(w: Matrix, start: torch.Tensor | None = None, *, seed: int = 0,
                 tol: float = 1e-7, residual_tol: float = RESIDUAL_TOL, max_iter: int = 200,
                 random_starts: int = RANDOM_STARTS,
                 exact_max_elements: int = EXACT_SVD_MAX_ELEMENTS) -> TopSingular:
    """σ_max(W): exact up to `exact_max_elements` (`exact_top`), else block power iteration.

    The iterative path (subspace iteration, Rutishauser 1970, with a Rayleigh–Ritz step)
    starts from `start` ([n] or [n, j]: the baseline's top vector, a few steps when σ barely
    moved, and the top vector of the edit W_s − W_b) plus `random_starts` seeded Gaussian
    vectors, so that a new dominant direction orthogonal to `start` is found too. After at
    least `MIN_ITERATIONS` it stops when the top Ritz value changes by at most `tol` and its
    residual ‖Wᵀu − σv‖/σ is at most `residual_tol`; after `BLOCK_ITERATIONS` the top Ritz
    vector is refined by single-vector power iteration to `tol`, and its residual is
    recorded. The Ritz value never exceeds σ_max. `w` may be known by its products alone
    (`RowProducts`): it is then formed only for the exact path.
    """
    if isinstance(w, torch.Tensor):
        w = w.to(torch.float32)
    m, n = w.shape
    if m * n <= exact_max_elements or min(m, n) <= random_starts + 3:
        return exact_top(w if isinstance(w, torch.Tensor) else w.dense())
    by_transpose, by = _products(w)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    block = [torch.randn(n, random_starts, generator=gen)]
    if start is not None:
        block.insert(0, start.detach().to("cpu", torch.float32).reshape(n, -1))
    # the block is kept as rows, [k, n]: a few rows times the matrix is a fast product,
    # where the matrix times a few columns takes torch's CPU kernels 5x as long
    q = torch.linalg.qr(torch.cat(block, dim=1).to(w.device))[0].T
    sigma, prev, residual = 0.0, -1.0, float("inf")
    v = q[0]
    for i in range(1, min(max_iter, BLOCK_ITERATIONS) + 1):
        z = by_transpose(q)                             # [k, m]: (W Qᵀ)ᵀ
        y = by(z)                                       # [k, n]: the next block, and Wᵀu
        evals, evecs = torch.linalg.eigh(z @ z.T)       # Rayleigh–Ritz on the k×k Gram
        top = evecs[:, -1]
        sigma = float(evals[-1].clamp_min(0).sqrt())
        if sigma == 0.0:
            return TopSingular(0.0, v, i, 0.0)
        v = top @ q
        if i >= MIN_ITERATIONS and abs(sigma - prev) <= tol * sigma:
            # u = Wv/σ, so Wᵀu = (WᵀW Qᵀ)·top/σ: the residual costs no product
            residual = float((top @ y / sigma - sigma * v).norm()) / sigma
            if residual <= residual_tol:
                return TopSingular(sigma, v, i, residual)
        prev = sigma
        q = torch.linalg.qr(y.T)[0].T
    steps = min(max_iter, BLOCK_ITERATIONS)
    if max_iter > steps:
        sigma, v, more = power_iteration(w, v, tol=tol, max_iter=max_iter - steps)
        steps += more
    if sigma == 0.0:
        return TopSingular(0.0, v, steps, 0.0)
    residual = float((by(by_transpose(v[None]))[0] / sigma - sigma * v).norm()) / sigma
    if residual > residual_tol:
        log.debug("top_singular: residual %.2e after %d iterations", residual, steps)
    return TopSingular(sigma, v, steps, residual)
