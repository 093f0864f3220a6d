"""Deterministic masked-LM masking (BERT's 15% with 80/10/10), pure numpy.

Both models of a comparison must be scored on exactly the same masked positions, so the mask
of a window depends only on the run seed, the window's stable id and its token ids — never on
the model, the batch or the order windows are processed in. Each window gets its own generator,
``np.random.default_rng([seed, window_id])``.

Per window: k = max(1, round(15% of the non-special positions)) positions are chosen without
replacement; each chosen position becomes [MASK] with probability 0.8, a random non-special
token with probability 0.1, and keeps its token otherwise. Labels hold the original id at the
chosen positions and -100 elsewhere, so scoring covers exactly the chosen positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MASK_RATE = 0.15
MASK_PROB = 0.8      # of chosen positions → [MASK]
RANDOM_PROB = 0.1    # of chosen positions → a random non-special id; the rest keep their id
IGNORE_INDEX = -100  # label of positions that are not scored
# Recorded in the window plan digest: changing any rule above must change this string.
MASK_SCHEME = "mlm-v1:rate=0.15,min=1,mask=0.8,random=0.1,keep=0.1,rng=default_rng([seed,id])"


def mask_windows(input_ids: np.ndarray, window_ids: np.ndarray, *, seed: int,
                 mask_token_id: int, special_ids: Iterable[int],
                 vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask each window [N, T] deterministically; returns (masked ids, labels), both int64 [N, T].

    Special ids ([CLS], [SEP], [PAD], ...) are never chosen and never drawn as replacements.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    wids = np.asarray(window_ids, dtype=np.int64)
    if ids.ndim != 2 or wids.shape != (ids.shape[0],):
        raise ValueError(f"input_ids must be [N, T] with N window ids; got {ids.shape} "
                         f"and {wids.shape}")
    if seed < 0 or (wids < 0).any():
        raise ValueError("seed and window ids must be non-negative")
    special = np.unique(np.asarray(list(special_ids), dtype=np.int64))
    replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special)
    if replacements.size == 0:
        raise ValueError("the vocabulary has no non-special tokens to draw replacements from")

    masked = ids.copy()
    labels = np.full_like(ids, IGNORE_INDEX)
    eligible = ~np.isin(ids, special)
    for row, wid in enumerate(wids.tolist()):  # one generator per window, not per token
        positions = np.flatnonzero(eligible[row])
        if positions.size == 0:
            continue
        k = max(1, int(np.floor(MASK_RATE * positions.size + 0.5)))
        rng = np.random.default_rng([seed, wid])
        chosen = np.sort(rng.choice(positions, size=k, replace=False))
        action = rng.random(k)
        to_mask = chosen[action < MASK_PROB]
        to_random = chosen[(action >= MASK_PROB) & (action < MASK_PROB + RANDOM_PROB)]
        labels[row, chosen] = ids[row, chosen]
        masked[row, to_mask] = mask_token_id
        masked[row, to_random] = replacements[rng.integers(0, replacements.size, to_random.size)]
    return masked, labels
