"""Per-window scores of one model on one window set, batched.

Causal LM: window w with ids x_1..x_T scores NLL_w = -sum_{t>=2} log p(x_t | x_<t), over the
positions whose token and predecessor are both attended, so n_w = T - 1 for a full window.
Masked LM: NLL summed over the positions whose label is not -100 (the masked ones), given
the masked input. Classifier: 1 if argmax(logits) equals the label, else 0, one "token" per
example. Values are float64 sums of float32 per-token losses (logits are upcast to float32
first, whatever the model dtype).

Language models are scored without ever holding a whole batch's logits: the forward pass
stops at the output head (``get_output_embeddings``), and the final hidden states go through
the head in pieces, each piece's logits turned into per-token losses and dropped. A plain
linear head is applied one slice of the vocabulary at a time to every scored position (a
running log-sum-exp); any other head a chunk of positions at a time. Pieces are sized from a
memory budget, so scoring memory is O(positions x slice), or O(chunk x vocabulary), whatever
the batch size. A model whose forward changes the head's output afterwards (logit
soft-capping, scaling) is detected on a short probe pass before the windows and scored
through its full logits instead.

Windows with NaN or Inf in their logits at attended positions (chunked scoring: in the final
hidden states at attended positions, or NaN/+inf in the logits at scored positions, which
makes their loss non-finite) are counted in ``nonfinite_windows`` and get NaN values instead
of raising: a broken subject is evidence, not a crash.

Every window's fed ids are hashed from the very tensors passed to the forward (input ids,
attention mask, token types and labels, as little-endian int64): ``WindowScores.fed_sha256``.
Comparing those with ``planned_sha256`` of the window set proves that a model saw exactly
the planned input, so the pairing check can fail when it did not.

Distribution evidence (``distribution=``, language models only) rides on the same pass: with
a number k, the model's top-k log-probabilities, tail mass and target log-probability at
every scored token are kept (``invarlock.distribution.CompactDistribution``); with such a
compact form of another model (the baseline) on the same windows, every scored token is
compared with it: KL divergence both ways, top-token agreement, Δp of the target
(``TokenComparison``). Both work a vocabulary slice at a time beside the running
log-sum-exp (``invarlock.distribution_pass``), so their memory is O(positions x k),
independent of the vocabulary.

Taps let guards observe activations during the same pass: evaluate registers one forward
hook per tapped module for the duration of the call, passes each output to the tap, and
always returns None from the hook, so a tap can read outputs but never replace them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from invarlock.distribution import CompactDistribution, TokenComparison
from invarlock.enums import MetricKind
from invarlock.errors import InputError, MissingExtraError

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise MissingExtraError("evaluating models") from exc

from invarlock.distribution_pass import IGNORE, DistributionPass, RowStats, distribution_result

logger = logging.getLogger(__name__)

CPU_BUDGET_BYTES = 512 << 20    # per-batch temporaries on CPU (activations, logits, CE)
MPS_BUDGET_BYTES = 2 << 30
CUDA_BUDGET_FRACTION = 0.5      # of the free device memory, after the model is loaded
HEAD_BUDGET_SHARE = 8           # one head slice's or chunk's logits: 1/8 of the budget
CPU_SLICE_BYTES = 8 << 20       # float32 logits of one vocabulary slice on CPU (cache-sized)
CPU_SLICE_MIN_COLUMNS = 256     # narrower slices make the head's matmul inefficient
PROBE_TOKENS = 8                # positions in the pass that checks the head is the last step
MAX_BATCH = {"mps": 128, "cuda": 256}  # windows; beyond these, throughput stops growing
# On CPU a pass over about a thousand tokens is already as fast per token as any larger one
# (SmolLM2-135M, 128-token windows: batches of 8, 16 and 32 take 13.2-14.0, 13.3-14.9 and
# 14.5-15.9 s for 64 windows); larger batches only add memory and cache misses.
CPU_BATCH_TOKENS = 1024


class Windows(Protocol):
    """What evaluation reads from a window set (``invarlock.data.windows.WindowSet``)."""

    @property
    def window_ids(self) -> np.ndarray: ...            # int64 [N]
    @property
    def input_ids(self) -> np.ndarray: ...             # int64 [N, T]
    @property
    def attention_mask(self) -> np.ndarray: ...        # int64 [N, T], padding on the right
    @property
    def labels(self) -> np.ndarray | None: ...         # MLM [N, T] with -100 | classes [N]
    @property
    def token_type_ids(self) -> np.ndarray | None: ...  # [N, T] or None
    @property
    def sha256(self) -> tuple[str, ...]: ...           # per window


@dataclass(frozen=True)
class WindowScores:
    """One model's per-window results on one window set."""

    kind: MetricKind
    window_ids: np.ndarray      # int64 [N]
    sha256: tuple[str, ...]     # content hashes of the windows evaluated (copied from the set)
    tokens: np.ndarray          # int64 [N] tokens scored (1 per example for accuracy)
    values: np.ndarray          # float64 [N]: NLL sum in nats, or 1.0/0.0 correct; NaN if broken
    nonfinite_windows: int      # windows whose logits held NaN/Inf
    seconds: float              # wall time of the evaluation
    fed_sha256: tuple[str, ...] = ()  # per window, hash of the tensors actually fed (see above)
    distribution: CompactDistribution | TokenComparison | None = None  # see `distribution=`

    @property
    def n(self) -> int:
        return int(self.window_ids.shape[0])

    @property
    def tokens_per_second(self) -> float:
        return float(self.tokens.sum()) / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class TapContext:
    """The batch a tapped output belongs to (padding is on the right of attention_mask)."""

    window_ids: np.ndarray          # int64 [B] ids of the windows in this batch
    attention_mask: torch.Tensor    # [B, T] on the model's device


@runtime_checkable
class Tap(Protocol):
    """An observer of module outputs during ``evaluate_windows`` (e.g. a guard's statistics).

    ``modules`` names what to observe; ``observe`` receives each forward output (a tensor or
    tuple as the module returns it, under inference mode) with the batch it belongs to. The
    hook evaluate registers ignores any return value; a tap must not modify outputs in place.
    Taps observe the model's body: a language model's output head is applied outside the
    forward pass, in slices of its weight, and is not called as a module then.
    """

    def modules(self, model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]: ...

    def observe(self, name: str, output: Any, context: TapContext) -> None: ...


TapSet = Tap | Sequence[Tap]


def evaluate_windows(
    model: torch.nn.Module,
    windows: Windows,
    *,
    kind: MetricKind | str,
    device: str,
    batch_size: int | None = None,
    taps: TapSet | None = None,
    progress: bool = False,
    distribution: int | CompactDistribution | None = None,
) -> WindowScores:
    """Score every window of ``windows`` with ``model`` (already on ``device``), in batches.

    ``batch_size`` None picks one from the window length, the logits width and the device's
    memory (``auto_batch_size``); results do not depend on it beyond float rounding. The
    model is put in eval mode for the call and restored afterwards. ``distribution``: an
    int k keeps this model's compact distribution; another model's compact distribution
    (covering these windows) compares this one with it (see the module docstring).
    """
    kind = MetricKind(kind)
    n, seq_len = _validate(windows, kind)
    _check_device(model, device)
    _check_fits(model, windows, seq_len)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    fed: list[str] = []
    dist_parts: list[dict[str, torch.Tensor]] = []
    if kind is MetricKind.ACCURACY:
        distribution = None  # a classifier has no next-token distribution
    with torch.inference_mode(), _eval_mode(model):
        head = _chunkable_head(model, windows, kind, device) if n else None
        size = batch_size if batch_size is not None else auto_batch_size(
            model, n, seq_len, device, kind=kind, full_logits=head is None)
        scorer = _SCORERS[kind] if head is None else _CHUNKED_SCORERS[kind]
        with (
            _stopping_at(head, device) as chunked,
            _attached(model, taps) as set_context,
            _progress_bar(n, kind, progress) as bar,
        ):
            lo = 0
            while lo < n:
                hi = min(lo + size, n)
                batch = _to_device(windows, lo, hi, device)
                set_context(TapContext(np.asarray(windows.window_ids[lo:hi]),
                                       batch["attention_mask"]))
                dist = (None if distribution is None else
                        DistributionPass.for_windows(distribution, windows.window_ids[lo:hi],
                                                      device))
                try:
                    out = _forward(model, batch, kind, head)
                    parts.append(scorer(out, batch, dist=dist) if chunked is None
                                 else scorer(chunked, out, batch, dist=dist))
                    fed.extend(_fed_hashes(batch))
                    if dist is not None:
                        dist_parts.append(dist.collected())
                except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one too
                    if not _is_oom(exc):
                        raise
                    size = _shrink(size, seq_len, device, exc)
                    continue
                finally:
                    out = batch = None  # free this batch's outputs before the next forward
                bar.update(hi - lo)
                lo = hi
    values, tokens, broken = _collect(parts)
    seconds = time.perf_counter() - start
    values[broken] = np.nan
    evidence = (None if distribution is None else
                distribution_result(distribution, dist_parts, windows.window_ids, tokens))
    if broken.any():
        logger.warning("%d of %d windows produced non-finite logits", int(broken.sum()), n)
    return WindowScores(
        kind=kind, window_ids=np.asarray(windows.window_ids, dtype=np.int64).copy(),
        sha256=tuple(windows.sha256), tokens=tokens, values=values,
        nonfinite_windows=int(broken.sum()), seconds=seconds, fed_sha256=tuple(fed),
        distribution=evidence,
    )


class CausalRuntime(Protocol):
    """A runtime outside torch that scores one causal window from its ids
    (``invarlock.models.llamacpp.LlamaCppModel``): NLL of ids[1:], tokens, finiteness and
    the ids it was fed."""

    def score_causal(self, ids: np.ndarray) -> Any: ...


def evaluate_with_runtime(runtime: CausalRuntime, windows: Windows, *, kind: MetricKind | str,
                          progress: bool = False) -> WindowScores:
    """Score causal windows one at a time through ``runtime``: the same records
    ``evaluate_windows`` yields (same positions scored, same NaN for a broken window, fed
    hashes from the ids the runtime reports it was given)."""
    kind = MetricKind(kind)
    if kind is not MetricKind.PPL_CAUSAL:
        raise InputError(f"only causal language models can be evaluated by this runtime, "
                         f"not {kind}")
    n, _ = _validate(windows, kind)
    start = time.perf_counter()
    values, tokens = np.zeros(n, np.float64), np.zeros(n, np.int64)
    broken = np.zeros(n, bool)
    fed: list[str] = []
    with _progress_bar(n, kind, progress) as bar:
        for i in range(n):
            mask = np.asarray(windows.attention_mask[i], dtype=np.int64)
            length = int(mask.sum())
            if not mask[:length].all():
                raise InputError("a window's attention mask is not a prefix of ones "
                                 "(padding must be on the right)")
            result = runtime.score_causal(np.asarray(windows.input_ids[i, :length]))
            values[i], tokens[i], broken[i] = result.nll, result.tokens, not result.finite
            row = np.array(windows.input_ids[i], dtype=np.int64)
            row[:length] = result.fed
            fed.extend(_row_hashes({"input_ids": row[None], "attention_mask": mask[None]}))
            bar.update(1)
    values[broken] = np.nan
    if broken.any():
        logger.warning("%d of %d windows produced non-finite logits", int(broken.sum()), n)
    return WindowScores(
        kind=kind, window_ids=np.asarray(windows.window_ids, dtype=np.int64).copy(),
        sha256=tuple(windows.sha256), tokens=tokens, values=values,
        nonfinite_windows=int(broken.sum()), seconds=time.perf_counter() - start,
        fed_sha256=tuple(fed))


_FED_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def planned_sha256(windows: Windows) -> tuple[str, ...]:
    """Per window, the hash its fed tensors must have: what a faithful evaluation feeds."""
    arrays = {"input_ids": windows.input_ids, "attention_mask": windows.attention_mask,
              "token_type_ids": windows.token_type_ids, "labels": windows.labels}
    return _row_hashes({k: v for k, v in arrays.items() if v is not None})


def _fed_hashes(batch: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Hashes of the rows of the batch as it went to the model (one transfer per tensor)."""
    return _row_hashes({k: batch[k].cpu().numpy() for k in _FED_FIELDS if k in batch})


def _row_hashes(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    rows = int(arrays["input_ids"].shape[0])
    digests = [hashlib.sha256() for _ in range(rows)]
    for name in _FED_FIELDS:
        if name not in arrays:
            continue
        data = np.ascontiguousarray(arrays[name], dtype="<i8").reshape(rows, -1)
        for digest, row in zip(digests, data, strict=True):
            digest.update(name.encode())
            digest.update(row.tobytes())
    return tuple(d.hexdigest() for d in digests)


def auto_batch_size(
    model: torch.nn.Module, n: int, seq_len: int, device: str,
    *, kind: MetricKind = MetricKind.PPL_CAUSAL, full_logits: bool = True,
) -> int:
    """Windows per forward pass so the batch's temporaries stay within a memory budget.

    Per window: a rough bound on activations (12 hidden-size vectors and two heads x T x T
    attention maps per position) and, with ``full_logits`` (classifiers, and language
    models whose head cannot be scored in chunks), the logits (T x width in the model dtype,
    plus a float32 copy when that is narrower, the log-softmax inside cross-entropy, a
    finiteness mask). Chunked scoring keeps its logits to one vocabulary slice
    (``head_slice_columns``) or chunk of positions (``head_chunk_rows``), taken off the
    budget first. The budget is 512 MiB on CPU (where a batch also holds at most
    ``CPU_BATCH_TOKENS`` tokens), 2 GiB on MPS and half the free memory on CUDA.
    """
    config = getattr(model, "config", None)
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model", default=1024)
    heads = _config_int(config, "num_attention_heads", "n_head", default=16)
    if kind is MetricKind.ACCURACY:
        width = _config_int(config, "num_labels", default=2)
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        width = int(head.weight.shape[0]) if head is not None else _config_int(
            config, "vocab_size", default=50_000)
    elem = next(model.parameters()).element_size()
    per_position = _logit_bytes(width, elem)
    per_window = 4 * seq_len * (12 * hidden + 2 * heads * seq_len)
    budget = _budget(device)
    if full_logits or kind is MetricKind.ACCURACY:
        per_window += seq_len * per_position
    else:
        budget -= budget // HEAD_BUDGET_SHARE
    base = device.split(":")[0]
    most = CPU_BATCH_TOKENS // seq_len if base == "cpu" else MAX_BATCH.get(base, 32)
    size = max(1, min(n, most, budget // max(per_window, 1)))
    logger.debug("auto batch size %d (%d windows of %d tokens on %s)", size, n, seq_len, device)
    return size


def head_chunk_rows(width: int, elem: int, device: str) -> int:
    """Positions per chunk of chunked scoring: their logits and losses fit 1/8 of the budget."""
    return max(1, (_budget(device) // HEAD_BUDGET_SHARE) // _logit_bytes(width, elem))


def head_slice_columns(rows: int, width: int, elem: int, device: str) -> int:
    """Vocabulary entries per slice of sliced scoring: ``rows`` positions' logits of one slice
    (in the model dtype, plus a float32 copy when that is narrower; exponentiated in place)
    fit 1/8 of the budget. On CPU a slice is also kept near the size of the last-level cache
    (its float32 logits ~8 MiB, at least 256 columns), so that log-sum-exp reads back what
    the matmul just wrote: that is faster than one matmul over the whole vocabulary."""
    per_column = max(rows, 1) * (elem + (4 if elem < 4 else 0))
    columns = (_budget(device) // HEAD_BUDGET_SHARE) // per_column
    if device.split(":")[0] == "cpu":
        columns = min(columns, max(CPU_SLICE_MIN_COLUMNS, CPU_SLICE_BYTES // (4 * max(rows, 1))))
    if columns > 64:
        columns -= columns % 64  # rows of whole cache lines: the kernels' vector loads align
    return max(1, min(width, columns))


def _logit_bytes(width: int, elem: int) -> int:
    """Bytes per scored position: logits in the model dtype, a float32 copy when that is
    narrower, the log-softmax inside cross-entropy, a finiteness flag."""
    return width * (elem + (4 if elem < 4 else 0) + 4 + 1)


def _budget(device: str) -> int:
    base = device.split(":")[0]
    if base == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * CUDA_BUDGET_FRACTION)
    if base == "mps":
        return MPS_BUDGET_BYTES
    return CPU_BUDGET_BYTES


def _config_int(config: Any, *names: str, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _validate(windows: Windows, kind: MetricKind) -> tuple[int, int]:
    """Shapes must agree with each other and with the metric; returns (N, T)."""
    ids = windows.input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [N, T], got shape {ids.shape}")
    n, seq_len = ids.shape
    if windows.attention_mask.shape != ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    if len(windows.window_ids) != n or len(windows.sha256) != n:
        raise ValueError("window_ids and sha256 must have one entry per window")
    if windows.token_type_ids is not None and windows.token_type_ids.shape != ids.shape:
        raise ValueError("token_type_ids must have the shape of input_ids")
    labels = windows.labels
    if kind is MetricKind.PPL_CAUSAL and labels is not None:
        raise ValueError("causal windows carry no labels (targets are the next tokens)")
    if kind is MetricKind.PPL_MLM and (labels is None or labels.shape != ids.shape):
        raise ValueError("masked-LM windows need labels of shape [N, T] (-100 = not scored)")
    if kind is MetricKind.ACCURACY and (labels is None or labels.shape != (n,)):
        raise ValueError("classifier windows need one class label per window, shape [N]")
    return n, seq_len


def _check_device(model: torch.nn.Module, device: str) -> None:
    """The model must already be on ``device``: evaluation moves windows, never weights.

    A model spread by a device map (``hf_device_map``) moves each module's inputs itself;
    the windows go to ``device`` and its hooks take them from there."""
    if getattr(model, "hf_device_map", None):
        return
    wanted = torch.device(device)
    actual = next(model.parameters()).device
    if actual.type != wanted.type or (wanted.index is not None and actual.index != wanted.index):
        raise ValueError(f"the model is on {actual}, not on the requested device {device}")


def _check_fits(model: torch.nn.Module, windows: Windows, seq_len: int) -> None:
    """Window length and token ids must fit the model (else torch fails with an index error)."""
    config = getattr(model, "config", None)
    positions = _config_int(config, "max_position_embeddings", "n_positions", default=0)
    if positions and seq_len > positions:
        raise InputError(
            f"windows of {seq_len} tokens exceed the model's {positions} positions; "
            "use a smaller seq_len"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and windows.input_ids.size:
        rows = int(embeddings.weight.shape[0])
        top = int(windows.input_ids.max())
        if top >= rows or int(windows.input_ids.min()) < 0:
            raise InputError(
                f"token id {top} is outside the model's vocabulary of {rows}; the tokenizer "
                "does not belong to this model"
            )


def _to_device(windows: Windows, lo: int, hi: int, device: str) -> dict[str, torch.Tensor]:
    def move(array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array[lo:hi], dtype=np.int64))
        return host.to(device, non_blocking=True)

    batch = {"input_ids": move(windows.input_ids), "attention_mask": move(windows.attention_mask)}
    if windows.token_type_ids is not None:
        batch["token_type_ids"] = move(windows.token_type_ids)
    if windows.labels is not None:
        batch["labels"] = move(windows.labels)
    return batch


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: MetricKind,
             head: torch.nn.Module | None = None) -> torch.Tensor:
    """The batch's logits, or with ``head`` the final hidden states the head would read."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if kind is MetricKind.PPL_CAUSAL:
        inputs["use_cache"] = False  # no KV cache: one pass, nothing to reuse
    if head is not None:
        try:
            model(**inputs)
        except _HeadReached as reached:
            return reached.hidden
        raise RuntimeError("the forward pass finished without calling the output head")
    logits = model(**inputs).logits
    expected = 2 if kind is MetricKind.ACCURACY else 3
    if logits.ndim != expected:
        raise ValueError(f"{kind.value} needs a model with {expected}-D logits, "
                         f"got shape {tuple(logits.shape)}")
    return logits


def _nonfinite_positions(logits: torch.Tensor) -> torch.Tensor:
    """Bool over all but the last dim: does that row of logits hold NaN or Inf?

    A float32 sum propagates NaN/Inf and reads the logits once without a [.., V] mask
    (isfinite().all() is ~30x slower on CPU); rows it flags are re-checked exactly, so a
    finite row whose sum overflows is not miscounted.
    """
    suspect = ~torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))
    if suspect.any():
        suspect[suspect.clone()] = ~torch.isfinite(logits[suspect]).all(dim=-1)
    return suspect


def _nonfinite_rows(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: any attended position whose logits hold NaN/Inf."""
    return (_nonfinite_positions(logits) & mask.bool()).any(dim=-1)


def _score_causal(logits: torch.Tensor, batch: dict[str, torch.Tensor], *,
                  dist: DistributionPass | None = None) -> tuple[torch.Tensor, ...]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t, v = logits.shape
    # Position t predicts token t+1; the last position predicts nothing. Targets are laid
    # out on the logits' own grid so the [B*T, V] view below needs no copy.
    targets = torch.full_like(ids, IGNORE)
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    targets[:, :-1] = torch.where(scored, ids[:, 1:], IGNORE)
    flat = logits.reshape(b * t, v).float()
    losses = F.cross_entropy(flat, targets.reshape(-1),
                             reduction="none", ignore_index=IGNORE).view(b, t)
    if dist is not None:
        dist.full_rows(flat, targets.reshape(-1))
    flat = None
    return (losses.double().sum(dim=1), (targets != IGNORE).sum(dim=1),
            _nonfinite_rows(logits, mask))


def _score_mlm(logits: torch.Tensor, batch: dict[str, torch.Tensor], *,
               dist: DistributionPass | None = None) -> tuple[torch.Tensor, ...]:
    labels, mask = batch["labels"], batch["attention_mask"]
    chosen = labels != IGNORE                              # [B, T]
    # Cross-entropy only over the masked rows (about 15%), not the whole [B, T, V].
    rows = logits[chosen].float()
    row_losses = F.cross_entropy(rows, labels[chosen], reduction="none")
    if dist is not None:
        dist.full_rows(rows, labels[chosen])
    rows = None
    losses = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    losses[chosen] = row_losses
    return losses.double().sum(dim=1), chosen.sum(dim=1), _nonfinite_rows(logits, mask)


def _score_accuracy(logits: torch.Tensor, batch: dict[str, torch.Tensor], *,
                    dist: DistributionPass | None = None) -> tuple[torch.Tensor, ...]:
    correct = (logits.argmax(dim=-1) == batch["labels"]).double()
    ones = torch.ones_like(batch["labels"])
    return correct, ones, _nonfinite_positions(logits)


_SCORERS: dict[MetricKind, Callable[..., tuple[torch.Tensor, ...]]] = {
    MetricKind.PPL_CAUSAL: _score_causal,
    MetricKind.PPL_MLM: _score_mlm,
    MetricKind.ACCURACY: _score_accuracy,
}


class _HeadReached(BaseException):
    """Raised by the head's pre-hook to end a forward pass with the head's input.

    A BaseException, so that no ``except Exception`` inside model code swallows it.
    """

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("output head reached")
        self.hidden = hidden


class _HeadStop:
    """Pre-hook state: stop at the head during the model's pass, not during chunk calls."""

    def __init__(self) -> None:
        self.armed = True

    def __call__(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self.armed:
            raise _HeadReached(args[0])


@dataclass
class _ChunkedHead:
    """The output head applied in pieces, so that a batch's logits never exist at once.

    A plain ``nn.Linear`` head is applied a slice of the vocabulary at a time to every scored
    position: one large matmul per slice, a running log-sum-exp and the target logits picked
    from the slice that holds them. Any other head (quantized, hooked, offloaded) is called
    on a chunk of positions at a time, through its own forward.
    """

    module: torch.nn.Module
    device: str
    stop: _HeadStop      # disarmed while the head is called on chunks
    linear: tuple[torch.Tensor, torch.Tensor | None] | None  # (weight, bias) to slice

    def losses(self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
               dist: DistributionPass | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and non-finite flags of hidden[rows] (hidden [M, H], rows and
        targets [K], IGNORE = not scored).

        A row is flagged when its loss is not finite: NaN or +inf anywhere in its logits
        makes the log-partition non-finite. (Reading every logit again for -inf would cost
        a third of the cross-entropy; a -inf logit only zeroes one token's probability.)"""
        if self.linear is not None:
            weight, bias = self.linear
            x = hidden.index_select(0, rows).to(weight.device)
            columns = head_slice_columns(x.shape[0], weight.shape[0], weight.element_size(),
                                         self.device)
            stats = None if dist is None else dist.rows(targets.to(weight.device))
            losses = _vocab_sliced_losses(x, weight, bias, targets.to(weight.device), columns,
                                          stats)
            losses = losses.to(hidden.device)
            return losses, ~torch.isfinite(losses)
        return self._position_chunked_losses(hidden, rows, targets, dist)

    def _position_chunked_losses(self, hidden: torch.Tensor, rows: torch.Tensor,
                                 targets: torch.Tensor, dist: DistributionPass | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = _head_rows(self.module, self.device)
        losses = torch.zeros(rows.shape[0], dtype=torch.float32, device=hidden.device)
        broken = torch.zeros(rows.shape[0], dtype=torch.bool, device=hidden.device)
        self.stop.armed = False
        try:
            for lo in range(0, rows.shape[0], chunk):
                hi = min(lo + chunk, rows.shape[0])
                logits = self.module(hidden.index_select(0, rows[lo:hi]))   # [chunk, V]
                target = targets[lo:hi].to(logits.device)
                part = F.cross_entropy(logits.float(), target, reduction="none",
                                       ignore_index=IGNORE)
                losses[lo:hi] = part.to(losses.device)
                broken[lo:hi] = ~torch.isfinite(part).to(broken.device)
                if dist is not None:
                    dist.full_rows(logits.float(), target)
                logits = part = None
        finally:
            self.stop.armed = True
        return losses, broken


def _linear_parameters(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) when calling ``head`` computes exactly F.linear(x, weight, bias).

    Only a plain ``nn.Linear`` with dense floating-point parameters qualifies: subclasses and
    tensor subclasses (quantized layers), a replaced ``forward`` (accelerate's offload hooks)
    and hooks would all be bypassed by slicing the weight."""
    if (type(head) is not torch.nn.Linear or "forward" in vars(head) or head._forward_hooks
            or head._forward_pre_hooks):
        return None
    params = [head.weight] + ([] if head.bias is None else [head.bias])
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) or not p.is_floating_point()
           or p.device.type == "meta" for p in params):
        return None
    return head.weight, head.bias


def _vocab_sliced_losses(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, columns: int,
                         stats: RowStats | None = None) -> torch.Tensor:
    """Per-row cross-entropy of F.linear(x, weight, bias) against targets (IGNORE rows: 0),
    computed ``columns`` vocabulary entries at a time.

    log-partition: each slice's log-sum-exp (shifted by its row maxima), combined with
    logaddexp; target logit: picked from the slice that holds it (rows sorted by target once,
    so each slice's rows are one contiguous run). Every slice is computed into the same
    buffer and exponentiated in place: no allocation per slice, so no page faults of fresh
    memory in the loop. A target outside the vocabulary leaves its loss NaN. ``stats`` sees
    each slice's logits before they are exponentiated (distribution evidence)."""
    n, width = x.shape[0], weight.shape[0]
    # float64 running log-partition: float32 over many slices drifts by ~1e-5 nats, the size
    # of an 8-bit quant's whole KL divergence
    log_z = torch.full((n,), float("-inf"), dtype=torch.float64, device=x.device)
    picked = torch.full((n,), float("nan"), dtype=torch.float32, device=x.device)
    bounds = [*range(0, width, columns), width]
    order = torch.argsort(targets)
    edges = torch.searchsorted(targets[order],
                               torch.tensor(bounds, dtype=targets.dtype, device=x.device))
    edges = edges.tolist()
    size = n * min(columns, width)
    block = torch.empty(size, dtype=x.dtype, device=x.device)
    wide = block if x.dtype == torch.float32 else torch.empty(size, dtype=torch.float32,
                                                               device=x.device)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        logits = block[:n * (hi - lo)].view(n, hi - lo)
        if bias is None:
            torch.matmul(x, weight[lo:hi].T, out=logits)
        else:
            torch.addmm(bias[lo:hi], x, weight[lo:hi].T, out=logits)
        if wide is not block:
            logits = wide[:n * (hi - lo)].view(n, hi - lo).copy_(logits)
        hit = order[edges[i]:edges[i + 1]]
        if hit.numel():
            picked[hit] = logits[hit, targets[hit] - lo]
        top = logits.amax(dim=1)
        if stats is not None:
            stats.update(logits, lo, top)
        shift = torch.where(torch.isfinite(top), top, 0.0)
        log_z = torch.logaddexp(log_z, logits.sub_(shift[:, None]).exp_().sum(dim=1).log_()
                                .add_(shift).double())
    if stats is not None:
        stats.finish(log_z, picked)
    return torch.where(targets == IGNORE, 0.0, log_z - picked).float()


@contextlib.contextmanager
def _stopping_at(head: torch.nn.Module | None, device: str) -> Iterator[_ChunkedHead | None]:
    """While active, a forward pass of the model ends where ``head`` would be called."""
    if head is None:
        yield None
        return
    linear = _linear_parameters(head)  # decided before our hook and any tap is attached
    stop = _HeadStop()
    handle = head.register_forward_pre_hook(stop)
    try:
        yield _ChunkedHead(head, device, stop, linear)
    finally:
        handle.remove()


def _chunkable_head(model: torch.nn.Module, windows: Windows, kind: MetricKind,
                    device: str) -> torch.nn.Module | None:
    """The output head, when the model's logits are exactly the head's output.

    Checked on a probe pass over the first few positions of the first window (before any tap
    is attached): the head must be called once, on [batch, positions, hidden] input, and the
    model must return its output unchanged. Anything else (no head, soft-capping, scaling,
    a head called twice) scores through the full logits.
    """
    if kind is MetricKind.ACCURACY or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Module):
        return None
    probe = _to_device(windows, 0, 1, device)
    probe = {k: v[:, :PROBE_TOKENS] for k, v in probe.items()}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = head.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    try:
        logits = _forward(model, probe, kind)
    finally:
        handle.remove()
    if len(seen) != 1 or not isinstance(seen[0][1], torch.Tensor) or seen[0][0].ndim != 3:
        return None
    out = seen[0][1]
    same = out.shape == logits.shape and torch.equal(out.to(logits.device, logits.dtype),
                                                     logits)
    if not same:
        logger.info("the model changes its head's output; scoring through full logits")
        return None
    return head


def _head_rows(head: torch.nn.Module, device: str) -> int:
    weight = getattr(head, "weight", None)
    width = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 \
        else int(getattr(head, "out_features", 50_000))
    elem = weight.element_size() if isinstance(weight, torch.Tensor) else 4
    return head_chunk_rows(width, elem, device)


def _score_causal_chunked(head: _ChunkedHead, hidden: torch.Tensor,
                          batch: dict[str, torch.Tensor], *,
                          dist: DistributionPass | None = None) -> tuple[torch.Tensor, ...]:
    """_score_causal from the final hidden states [B, T, H], every attended position."""
    ids, mask = batch["input_ids"].to(hidden.device), batch["attention_mask"].to(hidden.device)
    targets = torch.full_like(ids, IGNORE)
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    targets[:, :-1] = torch.where(scored, ids[:, 1:], IGNORE)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    sums, bad = _scored_rows(head, hidden, mask, rows, targets.reshape(-1)[rows], dist)
    return sums, (targets != IGNORE).sum(dim=1), bad


def _score_mlm_chunked(head: _ChunkedHead, hidden: torch.Tensor,
                       batch: dict[str, torch.Tensor], *,
                       dist: DistributionPass | None = None) -> tuple[torch.Tensor, ...]:
    """_score_mlm from the head's input [B, T, H]: logits at the scored positions only."""
    labels = batch["labels"].to(hidden.device)
    mask = batch["attention_mask"].to(hidden.device)
    chosen = labels != IGNORE
    rows = chosen.reshape(-1).nonzero().squeeze(1)
    sums, bad = _scored_rows(head, hidden, mask, rows, labels.reshape(-1)[rows], dist)
    return sums, chosen.sum(dim=1), bad


def _scored_rows(head: _ChunkedHead, hidden: torch.Tensor, mask: torch.Tensor,
                 rows: torch.Tensor, targets: torch.Tensor,
                 dist: DistributionPass | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: summed loss of the flat positions `rows` against `targets`, and whether
    any of them (or any attended hidden state) was non-finite."""
    b, t = mask.shape
    losses, broken = head.losses(hidden.reshape(b * t, -1), rows, targets, dist)
    per_pos = torch.zeros(b * t, dtype=torch.float32, device=hidden.device)
    per_pos[rows] = losses
    bad = torch.zeros(b * t, dtype=torch.bool, device=hidden.device)
    bad[rows] = broken
    bad = bad.view(b, t) | (_nonfinite_positions(hidden) & mask.bool())
    return per_pos.view(b, t).double().sum(dim=1), bad.any(dim=1)


_CHUNKED_SCORERS: dict[MetricKind, Callable[..., tuple[torch.Tensor, ...]]] = {
    MetricKind.PPL_CAUSAL: _score_causal_chunked,
    MetricKind.PPL_MLM: _score_mlm_chunked,
}


def _collect(parts: list[tuple[torch.Tensor, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-batch results and bring them to the host in one transfer each."""
    if not parts:
        return np.zeros(0, np.float64), np.zeros(0, np.int64), np.zeros(0, bool)
    columns = zip(*parts, strict=True)
    values, tokens, broken = (torch.cat(column).cpu().numpy() for column in columns)
    return values.astype(np.float64), tokens.astype(np.int64), broken.astype(bool)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text


def _shrink(size: int, seq_len: int, device: str, exc: BaseException) -> int:
    """Halve the batch after running out of memory; at one window, give up clearly."""
    if size <= 1:
        raise InputError(
            f"out of memory on {device} evaluating one window of {seq_len} tokens; "
            "use a smaller seq_len or another device"
        ) from exc
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    logger.warning("out of memory at batch size %d on %s; retrying with %d",
                   size, device, size // 2)
    return size // 2


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the call; each module's own flag restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _attached(model: torch.nn.Module,
              taps: TapSet | None) -> Iterator[Callable[[TapContext], None]]:
    """Register observing hooks for ``taps``; yields a setter for the current batch context."""
    current: list[TapContext | None] = [None]
    handles = []
    tap_list: Sequence[Tap] = () if taps is None else (
        (taps,) if isinstance(taps, Tap) else tuple(taps))

    def observer(tap: Tap, name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            tap.observe(name, output, current[0])  # type: ignore[arg-type]
            return None  # never replace the module's output

        return hook

    try:
        for tap in tap_list:
            for name, module in tap.modules(model):
                handles.append(module.register_forward_hook(observer(tap, name)))

        def set_context(context: TapContext) -> None:
            current[0] = context

        yield set_context
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _progress_bar(n: int, kind: MetricKind, enabled: bool) -> Iterator[Any]:
    """tqdm on stderr when asked for; a no-op counter otherwise."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=n, unit="window", desc=f"evaluating ({kind.value})", file=sys.stderr,
              leave=False, dynamic_ncols=True) as bar:
        yield bar


class _NoBar:
    def update(self, _count: int) -> None:
        return None
