"""Harmful vocabulary edits for the zoo: damage to embedding and head rows that the
evaluation windows never read.

A window plan covers a share of a 50k–256k vocabulary; rows of the other tokens leave the
perplexity on the windows exactly unchanged, so only a per-row weight comparison can see a
scrambled, zeroed or spiked row (a conversion bug, a bad merge of added tokens, a corrupted
`lm_head`). Given the windows' token ids (`seen`), the edits touch only other tokens; without
them, a seeded half of the vocabulary. A head tied to the embedding is the same tensor and
is edited once; an untied head gets the same rows edited.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from invarlock.calibration.zoo_base import NotApplicable, _rng
from invarlock.edits.result import EditResult

ROWS = 16          # rows zeroed or spiked
SPIKE = 10.0       # a spiked row's one entry: this times the tensor's largest |w|

VocabEdit = Callable[..., EditResult]


def vocab_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(module name, [vocab, hidden] weight) of the input embedding and, when not tied to
    it, the output head."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(emb, "weight", None) is None:
        raise NotApplicable("the model has no input embedding this zoo edit can change")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    out = [(names[id(emb)], emb.weight)]
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr() and (
            head.weight.shape == emb.weight.shape):
        out.append((names[id(head)], head.weight))
    return out


def unseen_tokens(vocab: int, seen: Iterable[int] | None, gen: torch.Generator) -> torch.Tensor:
    """Token ids outside `seen` (sorted), or a seeded half of the vocabulary without it."""
    if seen is None:
        return torch.randperm(vocab, generator=gen)[: vocab // 2].sort().values
    mask = torch.ones(vocab, dtype=torch.bool)
    ids = torch.as_tensor(list(seen), dtype=torch.long)
    mask[ids[(ids >= 0) & (ids < vocab)]] = False
    return mask.nonzero().flatten()


def _record(name: str, seed: int, tensors: list[tuple[str, torch.Tensor]], rows: int,
            seen: Any, **plan: Any) -> EditResult:
    return EditResult(name, {"seed": seed, "rows": rows, "unseen_only": seen is not None,
                             **plan},
                      tuple(n for n, _ in tensors), sum(w.numel() for _, w in tensors), 0.0)


def vocab_permute(model: torch.nn.Module, seed: int,
                  seen: Iterable[int] | None = None) -> EditResult:
    """Every unseen token's embedding (and head) row replaced by another unseen token's,
    by a seeded permutation without fixed points (the review's attack)."""
    tensors = vocab_tensors(model)
    gen = _rng(seed, 20)
    ids = unseen_tokens(tensors[0][1].shape[0], seen, gen)
    if ids.numel() < 2:
        raise NotApplicable("vocab_permute: the evaluation windows contain every token but "
                            f"{ids.numel()}; no rows to permute unseen")
    shift = 1 + int(torch.randint(ids.numel() - 1, (1,), generator=gen))
    order = torch.randperm(ids.numel(), generator=gen)
    src = ids[order]
    dst = src.roll(shift)          # a cycle through the shuffled ids: no row keeps its own
    for _, w in tensors:
        w[dst] = w[src].clone()
    return _record("vocab_permute", seed, tensors, int(ids.numel()), seen)


def _chosen_rows(model: torch.nn.Module, seed: int, salt: int, seen: Any,
                 label: str) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
    tensors = vocab_tensors(model)
    gen = _rng(seed, salt)
    ids = unseen_tokens(tensors[0][1].shape[0], seen, gen)
    if ids.numel() == 0:
        raise NotApplicable(f"{label}: the evaluation windows contain every token")
    return tensors, ids[torch.randperm(ids.numel(), generator=gen)[:ROWS]]


def rows_zero(model: torch.nn.Module, seed: int,
              seen: Iterable[int] | None = None) -> EditResult:
    """16 unseen tokens' embedding (and head) rows set to zero."""
    tensors, rows = _chosen_rows(model, seed, 21, seen, "rows_zero")
    for _, w in tensors:
        w[rows] = 0.0
    return _record("rows_zero", seed, tensors, int(rows.numel()), seen)


def rows_spike(model: torch.nn.Module, seed: int,
               seen: Iterable[int] | None = None) -> EditResult:
    """16 unseen tokens' embedding (and head) rows with one entry (seeded column) set to
    ten times the tensor's largest |w|."""
    tensors, rows = _chosen_rows(model, seed, 22, seen, "rows_spike")
    gen = _rng(seed, 23)
    for _, w in tensors:
        cols = torch.randint(w.shape[1], (rows.numel(),), generator=gen)
        w[rows.to(w.device), cols.to(w.device)] = SPIKE * float(w.abs().amax())
    return _record("rows_spike", seed, tensors, int(rows.numel()), seen)


VOCAB: dict[str, VocabEdit] = {"vocab_permute": vocab_permute, "rows_zero": rows_zero,
                               "rows_spike": rows_spike}
