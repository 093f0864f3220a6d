"""Spectral probe: σ_max of every 2-D weight, baseline vs subject, one model resident.

σ is taken of each weight's *effective* form (`invarlock.guards.measure.fold`): the scale of
the norm that feeds it folded in, and function-preserving channel pairs balanced, so that a
reparametrisation that leaves the function unchanged leaves σ unchanged. The transform plan
is traced on the baseline and cached with it.

Baseline: σ_b and the top right singular vector v_b of every 2-D floating weight (tied
weights once), both cached with the baseline's results; taken when the baseline is loaded,
except for the block linears that get input sketches, whose σ_b is taken beside their gain
along the data once the sketches exist (one formed effective matrix for both).

Baseline passes (final phase): every block linear's inputs at seeded token positions of the
calibration windows, reduced to an input sketch per distinct input (`sketch`), cached with
the baseline too.

Subject: each baseline weight (and the norm scales and partners its effective form needs) is
streamed from the baseline's files (`WeightReader`); the subject's effective form takes each
pair class's sign from the baseline's (`fold.Reference`: a sign flip of both sides of a
pair changes no norm, only this alignment sees it). An unchanged effective matrix
(bit-identical) keeps σ_b; a changed one is checked against the files (a cached σ_b the
files' matrix does not have along the cached v_b is taken again from the files, so a planted
cache entry cannot claim the subject's σ), and gets σ_s, the edit size ‖W_s − W_b‖₂/σ_b and, for
a block linear, the edit size along the data ‖ΔW·X‖_F/‖W_b·X‖_F on its input sketch.

A block linear with an input sketch also gets its gain along the data, σ_max(W_eff·C̃^½)
(`sketch.data_matrix`, iterated on by its products: `sketch.DataMatrix`), for the baseline
when the sketches are made (cached with its top
vector, checked against the files like σ_b) and for the subject: the σ the guard gates for
that module (`sigma_basis: data`). Weight-space σ stays in the record: GPTQ's error feedback
can raise it by 175% on an input channel the text never drives with the outputs unchanged.
The subject's matrix is taken with a balanced pair's change of magnitude moved onto the
pair's side b (`fold.data_factors`: the consumer of v→o and up→down, k of q/k), so a change
confined to a channel the data never drives is not seen on the producer through the balance.

A plain matrix (neither folded nor balanced) of `ROW_BLOCKS_MIN_ELEMENTS` or more without an
input sketch (an embedding, an untied head) is read from the files a block of rows at a
time into its difference from the subject (`BaselineRows`): the baseline's copy of it is
never whole in memory beside the difference.

Every σ is exact (the smaller Gram matrix's top eigenvector, σ = ‖Wv‖) up to
`EXACT_SVD_MAX_ELEMENTS`; beyond, a block power iteration from v_b plus seeded random
starts, accepted on a residual check (`top_singular`): a new dominant
direction orthogonal to v_b (a rank-1 spike) is found, where a single vector warm-started at
v_b would stay on the baseline's direction and report no change. The edit size is taken
first (at most `EDIT_SIZE_ITERATIONS` steps on the iterative path: a lower bound there, exact
below the limit), and its top right singular vector joins v_b as a start for σ_s, so a new
dominant direction the edit brings in is in the block from the first step.

On the CPU the matrices are measured on a few threads, one matrix each (`map_matrices`),
while this thread reads and forms the next; every record is the same for any number.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from invarlock.families import family_of
from invarlock.guards.base import not_measured
from invarlock.guards.measure import sketch
from invarlock.guards.measure.fold import (
    Reference,
    data_factors,
    effective,
    input_scales,
    is_plain,
    transform_plan,
)
from invarlock.guards.measure.probe import Probe, SubjectContext
from invarlock.guards.measure.rmt import linear_modules
from invarlock.guards.measure.weights import (
    EXACT_SVD_MAX_ELEMENTS,
    RANDOM_STARTS,
    RESIDUAL_TOL,
    TopSingular,
    WeightReader,
    map_matrices,
    matrix_workers,
    paired_getters,
    row_blocks,
    single_thread,
    top_singular,
)
from invarlock.guards.rmt import FAMILIES
from invarlock.models.effective import EffectiveWeights, named_matrices

log = logging.getLogger(__name__)

EDIT_SIZE_ITERATIONS = 12
CACHED_SIGMA_RTOL = 1e-4  # cached σ_b and the files' σ_b agree to this unless the cache lies
SIGMA_TOL = 1e-6
# σ along the data is compared at the deadband's scale (5-20%) and its robust z divides by at
# least 1% of it: 1e-5 relative is ample, and the gain costs a second σ per module
DATA_SIGMA_TOL = 1e-5
DIAGNOSTIC_SIGMA_TOL = 1e-4  # a weight-space σ that no gate reads (recorded to 0.01%)
BASELINE_STARTS = 6  # no warm start for the baseline: a wider random block (computed once)


@dataclass(frozen=True)
class BaselineRows:
    """A plain baseline matrix read from its files a block of rows at a time, as the
    subject's parameter dtype (what the whole read would have been converted to)."""

    read: Callable[[int, int], torch.Tensor]
    rows: int
    dtype: torch.dtype

    def difference(self, ws: torch.Tensor, start: torch.Tensor
                   ) -> tuple[torch.Tensor | None, float]:
        """(W_s − W_b, None where the two are bit-identical; ‖W_b v‖ for the cached v)."""
        delta = None  # formed at the first block that differs: zeros above it
        v = start.to(device=ws.device, dtype=ws.dtype)
        gain_squared = 0.0
        for lo, hi, read in row_blocks(self.read, self.rows, int(ws.shape[1])):
            block = read.to(self.dtype).to(device=ws.device, dtype=ws.dtype)
            if delta is None and not torch.equal(ws[lo:hi], block):
                delta = torch.zeros_like(ws)
            if delta is not None:
                torch.sub(ws[lo:hi], block, out=delta[lo:hi])
            gain_squared += float(torch.linalg.vector_norm(block @ v)) ** 2
        return delta, math.sqrt(gain_squared)


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


def baseline_top(w: torch.Tensor, seed: int, diagnostic: bool = False
                 ) -> tuple[float, torch.Tensor]:
    """σ_max and top right singular vector of a float32 matrix (computed once, cached); a
    diagnostic σ (a matrix gated along the data) with the subject's looser settings."""
    top = top_singular(w, seed=seed, tol=DIAGNOSTIC_SIGMA_TOL if diagnostic else SIGMA_TOL,
                       random_starts=RANDOM_STARTS if diagnostic else BASELINE_STARTS,
                       exact_max_elements=EXACT_SVD_MAX_ELEMENTS)
    return top.sigma, top.vector


def encode_vector(v: torch.Tensor) -> str:
    return base64.b64encode(v.detach().cpu().to(torch.float32).numpy().tobytes()).decode()


def decode_vector(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())


class SpectralProbe(Probe):
    cache_settings: ClassVar[dict[str, Any]] = {
        "version": 5, "sketch_rows": sketch.SKETCH_ROWS, "sketch_rank": sketch.SKETCH_RANK}

    def __init__(self, policy: Mapping[str, Any]) -> None:
        super().__init__(policy)
        self._baseline: list[dict[str, Any]] = []
        self._plan: dict[str, Any] = {}
        self._linears: list[tuple[str, Any]] = []
        self._input_scales: dict[str, np.ndarray] = {}
        self._tap: sketch.InputTap | None = None
        self._modules: list[dict[str, Any]] | None = None
        self._unmatched: list[str] = []
        self._get: Callable[[str], torch.Tensor] | None = None
        self._deferred: list[tuple[int, str]] = []  # (index, name): σ taken with the sketches
        self._memo: dict[str, torch.Tensor] = {}
        self._device = torch.device("cpu")

    def baseline_loaded(self, model: Any) -> None:
        self._baseline = []
        self._device = _device_of(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        with single_thread():
            self._plan = transform_plan(model)
        get = lambda n: params[n].detach()  # noqa: E731
        memo: dict[str, torch.Tensor] = {}  # each pair's balancing scale, formed once
        self._linears = linear_modules(model, FAMILIES)
        # block linears get input sketches where there are calibration windows: their σ is
        # then gated along the data, and their weight-space σ is taken with the gain along the
        # data once the sketches exist (`baseline_state`), from one formed effective matrix
        sketched = {f"{name}.weight" for name, _ in self._linears} if \
            self.info is not None and self.info.calibration_ids.size else set()
        with torch.inference_mode(), single_thread():
            listed = matrices(model)
            self._baseline = [{"name": name, "family": str(family_of(name)),
                               "shape": list(param.shape)} for name, param in listed]
            self._deferred = [(i, name) for i, (name, _) in enumerate(listed)
                              if name in sketched]
            forms = ((i, effective(name, get, self._plan, memo))
                     for i, (name, _) in enumerate(listed) if name not in sketched)
            tops = map_matrices(lambda job: (job[0], baseline_top(job[1], seed=job[0])),
                                forms, matrix_workers(self._device), lambda job: job[1])
            for i, (sigma, v) in tops:
                self._baseline[i].update(sigma=sigma, vector=encode_vector(v))
        self._input_scales = {}
        with torch.inference_mode(), single_thread():
            for name, module in self._linears:
                try:
                    scale = input_scales(f"{name}.weight", get, self._plan,
                                         conv1d=_is_conv1d(module), memo=memo)
                except KeyError:  # a weight the plan needs is not a plain parameter
                    scale = None
                if scale is not None:
                    self._input_scales[name] = scale.float().cpu().numpy()
        # the deferred modules' σ need the effective weights once the sketches exist
        self._get, self._memo = get, memo

    def taps(self, model: Any, role: str, phase: str) -> list[Any]:
        info = self.info
        if role != "baseline" or phase != "final" or info is None or \
                info.calibration_ids.size == 0 or not self._linears:
            return []
        per_window = max(1, math.ceil(sketch.SKETCH_ROWS / info.calibration_ids.size))
        readers = {name: str(fold["norm"]) for name, _ in self._linears
                   if (fold := (self._plan.get(f"{name}.weight") or {}).get("fold"))}
        self._tap = sketch.InputTap(self._linears, info.calibration_ids, per_window, info.seed,
                                    self, self._input_scales, readers)
        return [self._tap]

    def baseline_state(self) -> dict[str, Any]:
        state = {"modules": self._baseline, "transforms": self._plan}
        tap, self._tap = self._tap, None  # drop its module references: the baseline can go
        get, self._get, memo, self._memo = self._get, None, self._memo, {}
        index: dict[str, dict[str, Any]] = {}
        table: list[dict[str, Any]] = []
        if tap is not None:
            conv1d = {name for name, module in self._linears if _is_conv1d(module)}
            with single_thread():
                table, rows = sketch.sketches(tap.rows)
            index = {f"{name}.weight": {"sketch": i, "conv1d": name in conv1d}
                     for name, i in rows.items()}
            state["sketches"] = table
            state["sketch_index"] = index
        if get is not None and self._deferred:
            self._sketched_tops(index, table, get, memo)
        self._deferred = []
        self._linears = []
        return state

    def _sketched_tops(self, index: dict[str, dict[str, Any]], table: list[dict[str, Any]],
                       get: Callable[[str], torch.Tensor], memo: dict[str, torch.Tensor]
                       ) -> None:
        """The deferred block linears' weight-space σ (into their module records) and, where
        they have a sketch with channel energy, their σ along the data and its top vector
        (into their index entries, cached with the sketches): both of one effective matrix.
        A module left without a gain along the data is gated in weight space: its σ then
        gets the baseline's full settings, not the diagnostic's."""
        decoded = {i: _sketch_pair(entry) for i, entry in enumerate(table)}

        def jobs() -> Iterator[tuple[int, str, torch.Tensor, Any]]:
            for i, name in self._deferred:
                entry = index.get(name)
                pair = None if entry is None else decoded[entry["sketch"]]
                w = effective(name, get, self._plan, memo)  # the baseline: its balanced form
                yield i, name, w, None if pair is None else (bool(entry["conv1d"]), pair)

        def tops(job: tuple[int, str, torch.Tensor, Any]
                 ) -> tuple[int, str, tuple[float, torch.Tensor], TopSingular | None]:
            i, name, w, along = job
            weights = baseline_top(w, seed=i, diagnostic=along is not None)
            if along is None:
                return i, name, weights, None
            conv1d, pair = along
            m = sketch.DataMatrix(w.T if conv1d else w, *pair)
            # warm start: one power step from the data's top direction (M's column 0, W·b₁)
            first = torch.zeros(1, m.shape[1], device=m.device)
            first[0, 0] = 1.0
            data = top_singular(m, m.by(m.by_transpose(first))[0], seed=_seed(name),
                                tol=DATA_SIGMA_TOL, exact_max_elements=EXACT_SVD_MAX_ELEMENTS)
            return i, name, weights, data

        with torch.inference_mode(), single_thread():  # formed as the threads take them
            found = map_matrices(tops, jobs(), matrix_workers(self._device),
                                 lambda job: job[2])
        for i, name, (sigma, v), data in found:
            self._baseline[i].update(sigma=sigma, vector=encode_vector(v))
            if data is not None:
                index[name]["data_sigma"] = data.sigma
                index[name]["data_vector"] = encode_vector(data.vector)

    def subject_loaded(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> None:
        reader = WeightReader(ctx.baseline_files)
        params = EffectiveWeights(ctx.model)  # float view; quantized modules dequantized
        plan = baseline.get("transforms") or {}
        unmatched: list[str] = []

        base_get, subject_get = paired_getters(reader, params, ctx.base_model_prefix,
                                               ctx.model)
        table = baseline.get("sketches") or []
        index = baseline.get("sketch_index") or {}
        decoded: dict[int, tuple[torch.Tensor, Any]] = {}
        base_memo: dict[str, torch.Tensor] = {}  # each model's pair scales, formed once
        subject_memo: dict[str, torch.Tensor] = {}
        # the subject's pair classes take the baseline's signs; the baseline's sides read for
        # them wait in its memo for its own `effective` calls, next in this walk
        reference = Reference(base_get, base_memo, hand_over=True)

        def along(name: str) -> Along | None:
            """The module's input sketch; None where the state has none it can read (the
            module is then not measured along the data, and says so by a null)."""
            try:
                entry = index.get(name)
                if entry is None or not 0 <= int(entry["sketch"]) < len(table):
                    return None
                i = int(entry["sketch"])
                if i not in decoded:
                    b = sketch.decode(table[i])
                    decoded[i] = (b, _sketch_pair(table[i], b))
                b, pair = decoded[i]
                sketched = Along(b, bool(entry["conv1d"]))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("spectral: unreadable input sketch for %s (%s)", name, exc)
                return None
            try:  # without a usable gain along the data the module is gated in weight space
                sigma = float(entry.get("data_sigma") or 0.0)
                if pair is None or not (math.isfinite(sigma) and sigma > 0):
                    return sketched
                v = decode_vector(entry["data_vector"])
                if v.numel() != b.shape[0] + b.shape[1]:
                    raise ValueError("the data's top vector does not fit the sketch")
                return replace(sketched, d=pair[1], sigma=sigma, vector=v)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("spectral: unreadable gain along the data for %s (%s)", name, exc)
                return sketched

        def pairs() -> Iterator[tuple[Any, ...]]:
            """(entry, W_s, W_b, how formed, sketch) of each comparable matrix, formed here
            (reads from the files stay on this thread)."""
            for entry in baseline["modules"]:
                name = entry["name"]
                subject = params.get(name)
                if subject is None or list(subject.shape) != entry["shape"]:
                    unmatched.append(name)
                    continue
                try:
                    ws = effective(name, subject_get, plan, subject_memo, reference)
                    sketched = along(name)
                    rows = None if sketched is not None or not is_plain(name, plan) else \
                        reader.large_rows(name, tuple(ws.shape), ctx.base_model_prefix,
                                          ctx.model)
                    wb = BaselineRows(rows, int(ws.shape[0]), subject.dtype) if rows else \
                        effective(name, base_get, plan, base_memo).to(ws.device)
                    if sketched is not None and sketched.sigma is not None:
                        sketched = replace(sketched, factors=tuple(
                            data_factors(name, subject_get, plan, axis, int(ws.shape[axis]),
                                         base_get, subject_memo, base_memo)
                            for axis in (0, 1)))
                except KeyError:
                    unmatched.append(name)
                    continue
                yield entry, ws, wb, _describe(plan.get(name)), sketched

        with torch.inference_mode(), single_thread():
            modules = map_matrices(lambda job: self._one(*job), pairs(),
                                   matrix_workers(_device_of(ctx.model)), lambda job: job[1])
        if unmatched:
            log.warning("spectral: %d baseline weight(s) not comparable (first: %s)",
                        len(unmatched), unmatched[0])
        self._modules = modules
        self._unmatched = unmatched

    @staticmethod
    def _one(entry: Mapping[str, Any], ws: torch.Tensor, wb: torch.Tensor | BaselineRows,
             transform: str, along: Along | None = None) -> dict[str, Any]:
        sigma_b = float(entry["sigma"])
        record = {"name": entry["name"], "family": entry["family"], "shape": entry["shape"],
                  "sigma_baseline": sigma_b, "sigma_subject": sigma_b, "edit_size": 0.0,
                  "edit_along_data": None if along is None else 0.0,
                  "changed": False, "iterations": 0, "transform": transform,
                  "sigma_basis": "weights"}
        data = along is not None and along.sigma is not None
        if data:
            record.update(sigma_basis="data", sigma_data_baseline=along.sigma,
                          sigma_data_subject=along.sigma)
        start = decode_vector(entry["vector"])
        if isinstance(wb, BaselineRows):  # read by row blocks: never whole beside delta
            found, gain = wb.difference(ws, start)
            if found is None:
                return record
            delta, wb = found, None
        else:
            if torch.equal(ws, wb):
                return record
            delta = ws - wb
            gain = float(torch.linalg.vector_norm(
                wb @ start.to(device=wb.device, dtype=wb.dtype)))
        if along is not None and wb is not None:
            # the subject with a balanced pair's change of magnitude on its side b
            # (`fold.data_factors`), as for the gain along the data (`_data_gain`): a change
            # of an undriven down_proj column is not counted again on up_proj's row
            along_ws = ws if all(f is None for f in along.factors) else \
                _apply(ws, along.factors)
            moved = delta if along_ws is ws else along_ws - wb
            base, change = (wb.T, moved.T) if along.conv1d else (wb, moved)
            record["edit_along_data"] = sketch.edit_along_data(change, base, along.b)
        seed = _seed(entry["name"])
        exact = EXACT_SVD_MAX_ELEMENTS
        # a cached state is only as trustworthy as whoever could write the cache, and the
        # files are what the subject is compared with: where the files' matrix does not have
        # the cached σ_b along the cached vector (one product), σ_b is taken from the files
        if not abs(gain - sigma_b) <= CACHED_SIGMA_RTOL * max(abs(sigma_b), 1e-30):
            files = top_singular(wb if wb is not None else ws - delta, start, seed=seed + 2,
                                 tol=SIGMA_TOL, exact_max_elements=exact)
            if math.isfinite(files.sigma):
                record["sigma_baseline_cached"] = sigma_b
                log.warning("spectral: %s: the cached baseline σ %.6g is not the files' %.6g",
                            entry["name"], sigma_b, files.sigma)
                sigma_b = files.sigma
                record["sigma_baseline"] = sigma_b
        edit = top_singular(delta, start, seed=seed + 1, tol=1e-3,
                            max_iter=EDIT_SIZE_ITERATIONS, exact_max_elements=exact)
        # the edit's own top direction joins the warm start: where the edit adds a new
        # dominant direction (a spike), the block starts on it
        starts = torch.stack([start.to(edit.vector.device), edit.vector], dim=1)
        # where σ is gated along the data, the weight-space σ is a recorded diagnostic: its
        # block is the warm starts alone (the edit's top vector finds a spike) at a looser tol
        top = top_singular(ws, starts, seed=seed, tol=DIAGNOSTIC_SIGMA_TOL if data else SIGMA_TOL,
                           random_starts=0 if data else RANDOM_STARTS,
                           exact_max_elements=0 if data else exact)
        size = edit.sigma / sigma_b if sigma_b > 0 else 0.0
        sigma_s = top.sigma
        # JSON has no inf/NaN: a norm that is not finite is stored as None
        record.update(sigma_subject=sigma_s if math.isfinite(sigma_s) else None, changed=True,
                      iterations=top.iterations, edit_size=size if math.isfinite(size) else None,
                      residual=top.residual if math.isfinite(top.residual) else None)
        if data and wb is not None:
            record.update(_data_gain(entry["name"], along, along_ws, wb, delta, edit.vector,
                                     seed))
        return record

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        if self._modules is None:
            raise RuntimeError("spectral probe measured before the subject was loaded")
        if not self._modules:
            return {**not_measured("no module matched: no 2-D weight of the baseline could be "
                                   "compared with the subject"),
                    "unmatched": list(self._unmatched)}
        return {"evaluated": True, "modules": self._modules,
                "unmatched": list(self._unmatched),
                "method": {"effective_weights": "norm scale folded in, channel pairs balanced",
                           "exact_svd_max_elements": EXACT_SVD_MAX_ELEMENTS,
                           "random_starts": RANDOM_STARTS,
                           "power_iteration_tol": SIGMA_TOL,
                           "data_power_iteration_tol": DATA_SIGMA_TOL,
                           "diagnostic_power_iteration_tol": DIAGNOSTIC_SIGMA_TOL,
                           "residual_tol": RESIDUAL_TOL,
                           "edit_size_iterations": EDIT_SIZE_ITERATIONS,
                           "input_sketch": {"rows": sketch.SKETCH_ROWS,
                                            "rank": sketch.SKETCH_RANK,
                                            "windows": "calibration",
                                            "modules": len(baseline.get("sketch_index")
                                                           or {})}}}


@dataclass(frozen=True)
class Along:
    """A block linear's input sketch B, whether its effective matrix is stored transposed
    (GPT-2's Conv1D), and, where the baseline state has them, the residual channel scales
    d and the baseline's σ and top vector along the data."""

    b: torch.Tensor
    conv1d: bool
    d: torch.Tensor | None = None
    sigma: float | None = None
    vector: torch.Tensor | None = None
    # per axis of the subject's stored effective matrix, `fold.data_factors`
    factors: tuple[torch.Tensor | None, ...] = (None, None)


def _apply(w: torch.Tensor, factors: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """The effective matrix (stored orientation) in the form its data gain is taken of."""
    rows, columns = factors
    if rows is not None:
        w = w * rows.to(device=w.device, dtype=w.dtype)[:, None]
    if columns is not None:
        w = w * columns.to(device=w.device, dtype=w.dtype)[None, :]
    return w


def _data_gain(name: str, along: Along, ws: torch.Tensor, wb: torch.Tensor,
               delta: torch.Tensor, edit_vector: torch.Tensor, seed: int) -> dict[str, Any]:
    """The subject's σ along the data, `ws` in its form along the data (and the baseline's,
    taken again from the files where the cached one does not hold along its cached vector)."""
    b, d = along.b, along.d
    base, subject = (wb.T, ws.T) if along.conv1d else (wb, ws)
    files_m = sketch.DataMatrix(base, b, d)
    v = along.vector.to(device=files_m.device, dtype=torch.float32)
    gain = float(torch.linalg.vector_norm(files_m.by_transpose(v[None])))  # ‖M_b v‖
    out: dict[str, Any] = {}
    sigma_b = float(along.sigma)
    exact = EXACT_SVD_MAX_ELEMENTS
    if not abs(gain - sigma_b) <= CACHED_SIGMA_RTOL * max(abs(sigma_b), 1e-30):
        files = top_singular(files_m, v, seed=seed + 4, tol=DATA_SIGMA_TOL,
                             exact_max_elements=exact)
        if math.isfinite(files.sigma):
            log.warning("spectral: %s: the cached σ along the data %.6g is not the files' "
                        "%.6g", name, sigma_b, files.sigma)
            out["sigma_data_baseline_cached"] = sigma_b
            out["sigma_data_baseline"] = sigma_b = files.sigma
    m = sketch.DataMatrix(subject, b, d)
    # the edit's top output direction, pulled back through the subject's data matrix:
    # where the edit brings in a new dominant direction, the block starts on it
    left = edit_vector if along.conv1d else delta @ edit_vector.to(delta.dtype)
    out_factor = along.factors[1 if along.conv1d else 0]
    if out_factor is not None:
        left = left * out_factor.to(left.device)
    pulled = m.by(left.to(device=m.device, dtype=torch.float32)[None])[0]
    starts = torch.stack([v, pulled], dim=1) if float(pulled.norm()) > 0 else v
    top = top_singular(m, starts, seed=seed + 3, tol=DATA_SIGMA_TOL, exact_max_elements=exact)
    out["sigma_data_subject"] = top.sigma if math.isfinite(top.sigma) else None
    return out


def _device_of(model: Any) -> torch.device:
    """Where the model's first parameter lives (the CPU for a model without any)."""
    param = next(iter(model.parameters()), None)
    return torch.device("cpu") if param is None else param.device


def _sketch_pair(entry: Mapping[str, Any], b: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, d) of a stored sketch (B: decoded here unless given), for `sketch.data_matrix`;
    None where it keeps no channel energy (the module is then gated in weight space)."""
    energy = sketch.decode_energy(entry)
    if energy is None:
        return None
    b = sketch.decode(entry) if b is None else b
    return b, sketch.residual_scales(b, energy)


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D"


def _seed(name: str) -> int:
    """A seed per module name, stable across runs and processes (not Python's hash)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _describe(entry: Mapping[str, Any] | None) -> str:
    """One line: how the effective matrix was formed (recorded per module)."""
    if not entry:
        return "as stored"
    parts = []
    if "fold" in entry:
        parts.append(f"× {entry['fold']['norm']}")
    if "balance" in entry:
        parts.append(f"balanced with {entry['balance']['partner']}")
    return "; ".join(parts)
