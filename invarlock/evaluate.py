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
through its full logits instead. The parts live in ``invarlock.evaluation``: ``batching``
(batch size and the memory budget), ``losses`` (scores from whole logits) and
``sliced_head`` (the head applied in pieces).

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
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise MissingExtraError("evaluating models") from exc

from invarlock.distribution_pass import DistributionPass, distribution_result
from invarlock.evaluation.batching import auto_batch_size, config_int, is_oom, shrink_batch
from invarlock.evaluation.losses import SCORERS
from invarlock.evaluation.sliced_head import CHUNKED_SCORERS, HeadReached, stopping_at

logger = logging.getLogger(__name__)

PROBE_TOKENS = 8                # positions in the pass that checks the head is the last step


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
    A tap whose ``observes_inputs`` is true receives each module's first positional input
    instead of its output. Taps observe the model's body: a language model's output head is
    applied outside the forward pass, in slices of its weight, and is not called as a module
    then.
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
        scorer = SCORERS[kind] if head is None else CHUNKED_SCORERS[kind]
        with (
            stopping_at(head, device) as chunked,
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
                    if not is_oom(exc):
                        raise
                    size = shrink_batch(size, seq_len, device, exc)
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
    positions = config_int(config, "max_position_embeddings", "n_positions", default=0)
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
        except HeadReached as reached:
            return reached.hidden
        raise RuntimeError("the forward pass finished without calling the output head")
    logits = model(**inputs).logits
    expected = 2 if kind is MetricKind.ACCURACY else 3
    if logits.ndim != expected:
        raise ValueError(f"{kind.value} needs a model with {expected}-D logits, "
                         f"got shape {tuple(logits.shape)}")
    return logits


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

def _collect(parts: list[tuple[torch.Tensor, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-batch results and bring them to the host in one transfer each."""
    if not parts:
        return np.zeros(0, np.float64), np.zeros(0, np.int64), np.zeros(0, bool)
    columns = zip(*parts, strict=True)
    values, tokens, broken = (torch.cat(column).cpu().numpy() for column in columns)
    return values.astype(np.float64), tokens.astype(np.int64), broken.astype(bool)


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
        inputs = bool(getattr(tap, "observes_inputs", False))

        def hook(_module: torch.nn.Module, args: Any, output: Any) -> None:
            seen = (args[0] if args else None) if inputs else output
            tap.observe(name, seen, current[0])  # type: ignore[arg-type]
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
