"""Tests for invarlock.stats: BCa against scipy, coverage, pairing, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from invarlock import stats


def _windows(seed: int, n: int = 200, shift: float = 0.02):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(60, 128, size=n).astype(float)
    base = tokens * rng.gamma(20.0, 0.15, size=n)
    subj = base + tokens * (shift + rng.normal(0.0, 0.05, size=n))
    return base, subj, tokens


def test_bca_matches_scipy_on_the_same_data():
    base, subj, tokens = _windows(0)
    numer = subj - base
    ours = stats.bca_ratio_of_sums(numer, tokens, replicates=20000, seed=1)
    ref = sps.bootstrap(
        (numer, tokens),
        lambda a, w, axis=-1: a.sum(axis=axis) / w.sum(axis=axis),
        paired=True, vectorized=True, method="BCa", n_resamples=20000,
        confidence_level=0.95, rng=np.random.default_rng(2),
    ).confidence_interval
    width = ref.high - ref.low
    # Different random streams: agreement within Monte Carlo error of the endpoints.
    assert ours.method == "bca"
    assert ours.low == pytest.approx(ref.low, abs=0.05 * width)
    assert ours.high == pytest.approx(ref.high, abs=0.05 * width)


def test_same_seed_same_interval_and_different_seed_differs():
    base, subj, tokens = _windows(3)
    a = stats.paired_log_loss(base, subj, tokens, replicates=500, seed=7)
    b = stats.paired_log_loss(base, subj, tokens, replicates=500, seed=7)
    c = stats.paired_log_loss(base, subj, tokens, replicates=500, seed=8)
    assert a == b
    assert a.delta.as_tuple() != c.delta.as_tuple()


def test_point_estimate_is_token_weighted_and_ratio_is_ppl_ratio():
    base, subj, tokens = _windows(4)
    result = stats.paired_log_loss(base, subj, tokens, replicates=200, seed=0)
    assert result.delta.estimate == pytest.approx((subj - base).sum() / tokens.sum())
    assert result.ratio == pytest.approx(result.subject_ppl / result.baseline_ppl, rel=1e-12)
    lo, hi = result.ratio_ci
    assert lo <= result.ratio <= hi


@pytest.mark.parametrize("seed", range(25))
def test_interval_contains_point_estimate_even_under_skew(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    numer = rng.lognormal(0.0, 2.0, size=n) * rng.choice([-1, 1], size=n)
    denom = rng.integers(1, 10, size=n).astype(float)
    ci = stats.bca_ratio_of_sums(numer, denom, replicates=300, seed=seed)
    assert ci.low <= ci.estimate <= ci.high


def test_coverage_by_simulation_is_near_nominal():
    """Over many simulated data sets the 95% interval covers the true θ about 95% of the time."""
    rng = np.random.default_rng(11)
    true_delta, sims, hits = 0.01, 300, 0
    for i in range(sims):
        tokens = rng.integers(100, 129, size=150).astype(float)
        per_token = true_delta + rng.standard_t(5, size=150) * 0.03
        ci = stats.bca_ratio_of_sums(per_token * tokens, tokens, replicates=400, seed=i)
        hits += ci.low <= true_delta <= ci.high
    coverage = hits / sims
    assert 0.90 <= coverage <= 0.985, coverage


def test_identical_models_give_unit_ratio_and_degenerate_interval():
    base, _, tokens = _windows(5)
    result = stats.paired_log_loss(base, base.copy(), tokens, replicates=100, seed=0)
    assert result.ratio == 1.0
    assert result.ratio_ci == (1.0, 1.0)
    assert result.delta.method == "degenerate"


def test_resampling_keeps_pairs_together():
    """A constant per-window shift gives a zero-width interval only if both arms move together."""
    base, _, tokens = _windows(6)
    subj = base + 0.05 * tokens
    ci = stats.paired_log_loss(base, subj, tokens, replicates=300, seed=0).delta
    assert ci.low == pytest.approx(0.05) and ci.high == pytest.approx(0.05)


def test_blocked_resampling_matches_single_block(monkeypatch):
    base, subj, tokens = _windows(7, n=50)
    whole = stats.bca_ratio_of_sums(subj - base, tokens, replicates=64, seed=3)
    monkeypatch.setattr(stats, "_BLOCK_INTEGERS", 50 * 8)
    blocked = stats.bca_ratio_of_sums(subj - base, tokens, replicates=64, seed=3)
    # Changing the block size is allowed to change the stream; both must still be valid BCa.
    assert blocked.low <= blocked.estimate <= blocked.high
    assert whole.estimate == blocked.estimate


def test_accuracy_difference_in_percentage_points():
    base = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1] * 20)
    subj = base.copy()
    subj[:6] = 0  # six examples lost (three were already wrong)
    result = stats.paired_accuracy(base, subj, replicates=1000, seed=0)
    assert result.difference_pp.estimate == pytest.approx(-100 * 4 / 200)
    assert result.difference_pp.low < result.difference_pp.estimate <= result.difference_pp.high
    assert result.ratio == pytest.approx(subj.mean() / base.mean())


@pytest.mark.parametrize(
    ("numer", "denom", "message"),
    [
        ([1.0, 2.0], [1.0], "differ in length"),
        ([], [], "at least one window"),
        ([1.0, float("nan")], [1.0, 1.0], "finite"),
        ([1.0, 2.0], [1.0, 0.0], "positive"),
        ([[1.0]], [[1.0]], "one-dimensional"),
    ],
)
def test_invalid_inputs_are_named(numer, denom, message):
    with pytest.raises(ValueError, match=message):
        stats.bca_ratio_of_sums(np.array(numer), np.array(denom), replicates=10, seed=0)


def test_accuracy_rejects_non_binary_values():
    with pytest.raises(ValueError, match="0 or 1"):
        stats.paired_accuracy(np.array([0.5, 1]), np.array([1, 1]), replicates=10, seed=0)
