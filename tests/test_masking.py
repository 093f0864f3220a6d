"""Masked-LM masking: deterministic per (seed, window id), 15% of non-special positions,
80/10/10 mask/random/keep, specials untouched."""

from __future__ import annotations

import numpy as np
import pytest

from invarlock.data.masking import IGNORE_INDEX, mask_windows

VOCAB = 200
SPECIAL = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
MASK_ID = 4


def _windows(n: int, t: int, seed: int = 0) -> np.ndarray:
    """Random content framed by [CLS] ... [SEP], with a [SEP] in the middle like a doc break."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(len(SPECIAL), VOCAB, size=(n, t))
    ids[:, 0], ids[:, -1], ids[:, t // 2] = 2, 3, 3
    return ids


def _mask(ids: np.ndarray, window_ids: np.ndarray | None = None, seed: int = 7):
    wids = np.arange(ids.shape[0]) if window_ids is None else window_ids
    return mask_windows(ids, wids, seed=seed, mask_token_id=MASK_ID, special_ids=SPECIAL,
                        vocab_size=VOCAB)


def test_masks_are_identical_across_calls():
    ids = _windows(20, 64)
    a_ids, a_lab = _mask(ids)
    b_ids, b_lab = _mask(ids.copy())
    assert np.array_equal(a_ids, b_ids) and np.array_equal(a_lab, b_lab)


def test_mask_depends_on_window_id_not_on_row_order():
    """A window keeps its mask wherever it sits in a batch: the rng is keyed by its id."""
    ids = _windows(10, 64)
    wids = np.arange(100, 110)
    masked, labels = _mask(ids, wids)
    perm = np.random.default_rng(1).permutation(10)
    masked_p, labels_p = _mask(ids[perm], wids[perm])
    assert np.array_equal(masked_p, masked[perm]) and np.array_equal(labels_p, labels[perm])


def test_other_seed_or_window_id_changes_the_mask():
    ids = _windows(10, 64)
    _, labels = _mask(ids, seed=7)
    _, labels_seed = _mask(ids, seed=8)
    _, labels_ids = _mask(ids, np.arange(10) + 1000)
    assert not np.array_equal(labels, labels_seed)
    assert not np.array_equal(labels, labels_ids)


def test_fifteen_percent_of_non_special_positions_are_chosen():
    ids = _windows(50, 128)
    _, labels = _mask(ids)
    eligible = (~np.isin(ids, SPECIAL)).sum(axis=1)
    chosen = (labels != IGNORE_INDEX).sum(axis=1)
    assert np.array_equal(chosen, np.maximum(1, np.floor(0.15 * eligible + 0.5)).astype(int))
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.005


def test_at_least_one_position_is_masked_in_a_short_window():
    ids = np.array([[2, 50, 60, 3]])
    _, labels = _mask(ids)
    assert (labels != IGNORE_INDEX).sum() == 1


def test_window_of_only_special_tokens_is_left_alone():
    ids = np.array([[2, 3, 3, 3]])
    masked, labels = _mask(ids)
    assert np.array_equal(masked, ids) and (labels == IGNORE_INDEX).all()


def test_80_10_10_split_over_many_windows():
    ids = _windows(2000, 64)
    masked, labels = _mask(ids)
    chosen = labels != IGNORE_INDEX
    n = chosen.sum()
    as_mask = (masked[chosen] == MASK_ID).sum() / n
    kept = (masked[chosen] == ids[chosen]).sum() / n
    replaced = 1.0 - as_mask - kept
    assert n > 15_000
    assert abs(as_mask - 0.8) < 0.015
    assert abs(replaced - 0.1) < 0.012
    assert abs(kept - 0.1) < 0.012


def test_specials_never_masked_nor_drawn_as_replacements():
    ids = _windows(500, 64)
    masked, labels = _mask(ids)
    special = np.isin(ids, SPECIAL)
    assert (labels[special] == IGNORE_INDEX).all()
    assert np.array_equal(masked[special], ids[special])
    replaced = (labels != IGNORE_INDEX) & (masked != MASK_ID) & (masked != ids)
    assert replaced.any() and not np.isin(masked[replaced], SPECIAL).any()


def test_labels_hold_originals_only_at_chosen_positions():
    ids = _windows(30, 64)
    masked, labels = _mask(ids)
    chosen = labels != IGNORE_INDEX
    assert np.array_equal(labels[chosen], ids[chosen])
    assert np.array_equal(masked[~chosen], ids[~chosen])


def test_bad_shapes_and_negative_seed_are_rejected():
    ids = _windows(3, 16)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        mask_windows(ids, np.arange(2), seed=0, mask_token_id=MASK_ID, special_ids=SPECIAL,
                     vocab_size=VOCAB)
    with pytest.raises(ValueError, match="non-negative"):
        mask_windows(ids, np.arange(3), seed=-1, mask_token_id=MASK_ID, special_ids=SPECIAL,
                     vocab_size=VOCAB)
