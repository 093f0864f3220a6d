"""Per-window scores from a batch's whole logits: causal and masked-LM NLL sums, classifier
correctness, and which windows saw NaN or Inf (see ``invarlock.evaluate`` for exactly what
is scored). Each scorer returns (values [B] float64, tokens [B], broken [B] bool).
"""

from __future__ import annotations

from collections.abc import Callable

from invarlock.enums import MetricKind
from invarlock.errors import MissingExtraError

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise MissingExtraError("evaluating models") from exc

from invarlock.distribution_pass import IGNORE, DistributionPass


def nonfinite_positions(logits: torch.Tensor) -> torch.Tensor:
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
    return (nonfinite_positions(logits) & mask.bool()).any(dim=-1)


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
    return correct, ones, nonfinite_positions(logits)


SCORERS: dict[MetricKind, Callable[..., tuple[torch.Tensor, ...]]] = {
    MetricKind.PPL_CAUSAL: _score_causal,
    MetricKind.PPL_MLM: _score_mlm,
    MetricKind.ACCURACY: _score_accuracy,
}
