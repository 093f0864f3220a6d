"""The output head applied in pieces, so that a batch's logits never exist at once.

The forward pass stops where the head (``get_output_embeddings``) would be called, and the
final hidden states go through the head in pieces, each piece's logits turned into
per-token losses and dropped. A plain linear head is applied one slice of the vocabulary at
a time to every scored position (a running log-sum-exp); any other head a chunk of
positions at a time. Pieces are sized from the memory budget
(``invarlock.evaluation.batching``), so scoring memory is O(positions x slice), or
O(chunk x vocabulary), whatever the batch size.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from invarlock.enums import MetricKind
from invarlock.errors import MissingExtraError

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise MissingExtraError("evaluating models") from exc

from invarlock.distribution_pass import IGNORE, DistributionPass, RowStats
from invarlock.evaluation.batching import head_chunk_rows, head_slice_columns
from invarlock.evaluation.losses import nonfinite_positions


class HeadReached(BaseException):
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
            raise HeadReached(args[0])


@dataclass
class ChunkedHead:
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
def stopping_at(head: torch.nn.Module | None, device: str) -> Iterator[ChunkedHead | None]:
    """While active, a forward pass of the model ends where ``head`` would be called."""
    if head is None:
        yield None
        return
    linear = _linear_parameters(head)  # decided before our hook and any tap is attached
    stop = _HeadStop()
    handle = head.register_forward_pre_hook(stop)
    try:
        yield ChunkedHead(head, device, stop, linear)
    finally:
        handle.remove()


def _head_rows(head: torch.nn.Module, device: str) -> int:
    weight = getattr(head, "weight", None)
    width = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 \
        else int(getattr(head, "out_features", 50_000))
    elem = weight.element_size() if isinstance(weight, torch.Tensor) else 4
    return head_chunk_rows(width, elem, device)


def _score_causal_chunked(head: ChunkedHead, hidden: torch.Tensor,
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


def _score_mlm_chunked(head: ChunkedHead, hidden: torch.Tensor,
                       batch: dict[str, torch.Tensor], *,
                       dist: DistributionPass | None = None) -> tuple[torch.Tensor, ...]:
    """_score_mlm from the head's input [B, T, H]: logits at the scored positions only."""
    labels = batch["labels"].to(hidden.device)
    mask = batch["attention_mask"].to(hidden.device)
    chosen = labels != IGNORE
    rows = chosen.reshape(-1).nonzero().squeeze(1)
    sums, bad = _scored_rows(head, hidden, mask, rows, labels.reshape(-1)[rows], dist)
    return sums, chosen.sum(dim=1), bad


def _scored_rows(head: ChunkedHead, hidden: torch.Tensor, mask: torch.Tensor,
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
    bad = bad.view(b, t) | (nonfinite_positions(hidden) & mask.bool())
    return per_pos.view(b, t).double().sum(dim=1), bad.any(dim=1)


CHUNKED_SCORERS: dict[MetricKind, Callable[..., tuple[torch.Tensor, ...]]] = {
    MetricKind.PPL_CAUSAL: _score_causal_chunked,
    MetricKind.PPL_MLM: _score_mlm_chunked,
}
