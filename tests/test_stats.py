"""Tests for invarlock.stats: BCa against scipy, coverage, pairing, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import ndtr, ndtri

from invarlock import stats
from invarlock.calibration import coverage


def _windows(seed: int, n: int = 200, shift: float = 0.02):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(60, 128, size=n).astype(float)
    base = tokens * rng.gamma(20.0, 0.15, size=n)
    subj = base + tokens * (shift + rng.normal(0.0, 0.05, size=n))
    return base, subj, tokens


def _scipy_interval(numer, tokens, method: str, seed: int):
    """scipy's interval at the level ours uses (the expanded level for this many windows)."""
    return sps.bootstrap(
        (numer, tokens), lambda a, w, axis=-1: a.sum(axis=axis) / w.sum(axis=axis),
        paired=True, vectorized=True, method=method, n_resamples=20000,
        confidence_level=1 - stats.expanded_alpha(0.05, numer.size),
        rng=np.random.default_rng(seed),
    ).confidence_interval


def test_expanded_level_known_values():
    """Values from a printed t table: t(0.975, 7) = 2.365 and t(0.975, 63) = 1.998 give
    z* = √(8/7)·2.365 = 2.528 and √(64/63)·1.998 = 2.014, whose two-sided normal tails are
    0.0115 and 0.0440; t(0.975, 199) = 1.972 gives 0.0481, t(0.95, 63) = 1.669 gives 0.0925.
    Fewer than three windows keep the nominal level; many windows approach it from below."""
    assert stats.expanded_alpha(0.05, 8) == pytest.approx(0.0115, abs=1e-4)
    assert stats.expanded_alpha(0.05, 64) == pytest.approx(0.0440, abs=1e-4)
    assert stats.expanded_alpha(0.05, 200) == pytest.approx(0.0481, abs=1e-4)
    assert stats.expanded_alpha(0.10, 64) == pytest.approx(0.0925, abs=1e-4)
    assert stats.expanded_alpha(0.05, 2) == 0.05
    assert 0.0499 < stats.expanded_alpha(0.05, 100_000) < 0.05


def test_expanded_bootstrap_interval_is_as_wide_as_students_t_on_symmetric_data():
    """What the expansion is for: on symmetric data (no bias, no acceleration) the bootstrap
    interval must be as wide as Student's t interval with the sample's own standard error
    (scipy), which the plain 95% percentiles are not (11% narrower at 16 windows)."""
    for n in (16, 24):
        half = np.random.default_rng(n).normal(size=n // 2)
        x = np.r_[half, -half] + 1.0
        ci = stats.bca_ratio_of_sums(x, np.ones(n), replicates=40000, seed=0)
        lo, hi = sps.t.interval(0.95, n - 1, loc=x.mean(), scale=sps.sem(x))
        assert ci.high - ci.low == pytest.approx(hi - lo, rel=0.02), n
        plain = np.quantile(stats._bootstrap_ratios(x, np.ones(n), replicates=40000, seed=0),
                            [0.025, 0.975])
        assert plain[1] - plain[0] < 0.95 * (hi - lo)


def test_bca_agrees_with_scipy_where_bca_and_percentile_differ():
    """Skewed per-window deltas (exponential) on varying token counts: BCa's bias and
    acceleration corrections move the interval well away from the percentile one, and ours
    must land on scipy's BCa, not near its percentile interval."""
    ours_err, pct_gap = [], []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(60, 128, size=25).astype(float)
        numer = tokens * rng.exponential(0.05, size=25)
        ours = stats.bca_ratio_of_sums(numer, tokens, replicates=20000, seed=seed)
        bca = _scipy_interval(numer, tokens, "BCa", 100 + seed)
        pct = _scipy_interval(numer, tokens, "percentile", 100 + seed)
        assert ours.method == "bca"
        ours_err += [abs(ours.low - bca.low), abs(ours.high - bca.high)]
        pct_gap += [abs(pct.low - bca.low), abs(pct.high - bca.high)]
    # Monte Carlo error of the endpoints is a small fraction of the BCa-percentile gap.
    assert np.mean(ours_err) < 0.25 * np.mean(pct_gap)
    assert max(ours_err) < 0.5 * np.mean(pct_gap)


def test_acceleration_has_the_known_closed_form_for_the_mean():
    """For the mean, jackknife acceleration is skewness / (6·sqrt(n)) (Efron 1987)."""
    x = np.random.default_rng(5).lognormal(0.0, 1.0, size=30)
    expected = sps.skew(x, bias=True) / (6.0 * np.sqrt(x.size))
    assert stats._jackknife_acceleration(x, np.ones_like(x)) == pytest.approx(expected,
                                                                             rel=1e-12)
    assert expected > 0.04  # a real correction, not rounding noise


def test_bca_lower_bound_approaches_the_exact_exponential_interval():
    """Known answer: for exponential data the exact interval of the mean is pivotal
    (2·n·mean/θ ~ χ²(2n)). BCa's lower bound is second-order accurate; the plain percentile
    bound is not, and lies several times farther from the exact one."""
    bca_err, pct_err = [], []
    for seed in range(6):
        x = np.random.default_rng(seed).exponential(1.0, size=25)
        n, m = x.size, x.mean()
        exact_low = 2 * n * m / sps.chi2.ppf(0.975, 2 * n)
        ours = stats.bca_ratio_of_sums(x, np.ones(n), replicates=20000, seed=seed)
        pct = np.quantile(stats._bootstrap_ratios(x, np.ones(n), replicates=20000, seed=seed),
                          stats.expanded_alpha(0.05, n) / 2)
        bca_err.append(abs(ours.low - exact_low))
        pct_err.append(abs(pct - exact_low))
    assert np.mean(bca_err) < 0.5 * np.mean(pct_err)


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


def test_bound_beyond_the_estimate_is_moved_to_it_and_only_then(monkeypatch):
    """BCa's adjusted level can put a bound past the estimate when almost every replicate
    lies on one side (z0 beyond the critical value). The interval must still contain the
    estimate: that bound becomes the estimate exactly, the other is the plain BCa quantile."""
    numer = np.array([0.3, -0.1, 0.2, 0.05, -0.2, 0.4, 0.0, 0.1])
    denom = np.ones_like(numer)
    estimate = numer.mean()
    # 99.8% of the replicates below the estimate, 0.2% above it.
    replicates = np.r_[estimate - np.linspace(0.001, 0.3, 998),
                       estimate + np.linspace(0.001, 0.01, 2)]
    monkeypatch.setattr(stats, "_bootstrap_ratios", lambda *a, **k: replicates)
    ci = stats.bca_ratio_of_sums(numer, denom, replicates=replicates.size, seed=0)
    z0 = ndtri(0.998)
    a = stats._jackknife_acceleration(numer, denom)
    half = stats.expanded_alpha(0.05, numer.size) / 2
    levels = [ndtr(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in (ndtri(half), ndtri(1 - half))]
    raw_low, raw_high = np.quantile(replicates, levels)
    assert ci.method == "bca" and ci.z0 == pytest.approx(z0)
    assert raw_low > estimate  # the unclamped BCa bound really excludes the estimate
    assert ci.low == estimate and ci.high == pytest.approx(raw_high, rel=1e-12)


def _normal_population(rng, runs, n):
    tokens = np.full((runs, n), 127.0)
    return (0.01 + 0.03 * rng.standard_normal((runs, n))) * tokens, tokens, 0.01


def test_upper_bound_misses_at_the_nominal_one_sided_rate():
    """The gate reads the upper end of a 95% interval: a one-sided 97.5% bound. On normal
    deltas over 64 windows BCa's upper bound misses the truth 2.5% of the time, within three
    Monte-Carlo standard errors (0.2 points over 6,000 runs); a 90% interval (5%) or a 99%
    one (0.5%) lies far outside."""
    rate = coverage.miss_rates(_normal_population, windows=64, runs=6000, replicates=500,
                               alpha=0.05, seed=1)
    se = rate.mc_error()
    assert abs(rate.bca - 0.025) <= 3 * se, rate
    assert rate.gate <= rate.bca  # the gate's bound is never nearer than BCa's
    for wrong in (0.10, 0.01):
        other = coverage.miss_rates(_normal_population, windows=64, runs=6000,
                                    replicates=500, alpha=wrong, seed=1)
        assert abs(other.bca - 0.025) > 3 * se, (wrong, other)


def test_gate_upper_bound_holds_on_heavy_tails_where_bca_alone_does_not():
    """Heavy-tailed deltas (Student t, 3 df) over 64 windows: BCa's upper bound misses about
    4% of the time at nominal 2.5%; the studentized/Student widening brings it to the nominal
    rate (within two Monte-Carlo standard errors)."""
    population = coverage.synthetic("t3", mean=0.005, sd=0.02)
    rate = coverage.miss_rates(population, windows=64, runs=6000, replicates=500, seed=2)
    assert rate.bca > 0.025 + 3 * rate.mc_error(), rate
    assert rate.holds(rate.gate), rate


def test_hall_transform_is_monotone_inverts_and_reduces_to_t_without_skew():
    """Hall's (1992) g(T) = T + γT²/(3√n) + γ²T³/(27n) + γ/(6√n): its inverse undoes it, it
    is the identity at γ = 0 (so the "hall" bound is then Student's), and it is increasing,
    so the bounds it gives are ordered like T's quantiles."""
    t = np.linspace(-6.0, 6.0, 121)
    for gamma, n in ((0.0, 64), (1.5, 64), (-2.0, 200), (3.3, 16)):
        g = stats.hall_transform(t, gamma, n)
        assert np.all(np.diff(g) >= 0), gamma
        back = [stats.hall_inverse(float(v), gamma, n) for v in g]
        assert np.allclose(back, t, atol=1e-9), gamma
    assert np.allclose(stats.hall_transform(t, 0.0, 64), t)
    assert stats.hall_transform(1.0, 1.5, 64) == pytest.approx(
        1 + 1.5 / 24 + 2.25 / (27 * 64) + 1.5 / 48)


def test_right_skewed_windows_move_the_upper_bound_out_by_halls_correction():
    """On right-skewed deltas (a few windows far above the rest) the analytic Hall bound
    lies above Student's t bound at the top and nearer at the bottom, and the gate's upper
    end is at least as far out as both; mirrored data mirror it."""
    rng = np.random.default_rng(4)
    tokens = np.full(64, 127.0)
    numer = tokens * (rng.lognormal(0.0, 0.75, size=64) - 1.3) * 0.01
    assert stats.sample_skewness(numer - numer.mean()) > 1.0
    gate = stats.studentized_ratio_of_sums(numer, tokens, replicates=500, seed=0)
    se = np.sqrt(np.sum((numer - gate.estimate * tokens) ** 2) * 64 / 63) / tokens.sum()
    t = sps.t.ppf(0.975, 63)
    gamma = stats.sample_skewness(numer - gate.estimate * tokens)
    hall_high = gate.estimate - stats.hall_inverse(-t, gamma, 64) * se
    hall_low = gate.estimate - stats.hall_inverse(t, gamma, 64) * se
    assert hall_high > gate.estimate + t * se and hall_low > gate.estimate - t * se
    assert gate.high >= hall_high - 1e-15 and gate.bounds_from[1] in ("hall",
                                                                         "hall_bootstrap")
    mirrored = stats.studentized_ratio_of_sums(-numer, tokens, replicates=500, seed=0)
    assert mirrored.low == pytest.approx(-gate.high, rel=1e-9)
    assert mirrored.bounds_from[0] == gate.bounds_from[1]


@pytest.mark.slow
def test_gate_upper_bound_holds_on_skewed_deltas_at_the_ci_window_count():
    """Lognormal deltas (skewness 3.3) over 200 windows, 10,000 runs (the table of
    CALIBRATION.md): BCa widened to the bootstrap-t and Student bounds alone missed 2.84%,
    above 2.5% + 2 s.e.; with Hall's skewness-corrected bounds the gate holds."""
    population = coverage.synthetic("lognormal", mean=0.0064, sd=0.00919, tokens=127)
    rate = coverage.miss_rates(population, windows=200, runs=10_000, replicates=1200,
                               alpha=0.05, seed=0)
    assert rate.bca > 0.025 + 2 * rate.mc_error(), rate
    assert rate.holds(rate.gate), rate


def test_vectorised_bounds_are_the_library_bounds_for_the_same_resamples():
    """`coverage.upper_bounds` (used to simulate thousands of runs) computes exactly what
    `stats.bca_ratio_of_sums` and `stats.studentized_ratio_of_sums` compute."""
    rng = np.random.default_rng(3)
    for n, replicates in ((64, 500), (200, 1200)):
        for seed in range(4):
            tokens = rng.integers(60, 128, size=n).astype(float)
            numer = tokens * (0.01 + 0.02 * rng.standard_t(3, size=n))
            gate = stats.studentized_ratio_of_sums(numer, tokens, replicates=replicates,
                                                   seed=seed)
            bca = stats.bca_ratio_of_sums(numer, tokens, replicates=replicates, seed=seed)
            idx = np.random.default_rng(seed).integers(0, n, size=(replicates, n))
            ours = coverage.upper_bounds(numer[None], tokens[None],
                                         coverage.count_matrix(idx, n), 0.05)
            assert ours["gate"][0] == pytest.approx(gate.high, rel=1e-9)
            assert ours["bca"][0] == pytest.approx(bca.high, rel=1e-9)


def test_widened_interval_contains_bca_and_names_its_bounds():
    base, subj, tokens = _windows(9, n=64)
    numer = subj - base
    numer[:3] += 40 * tokens[:3]  # three damaged windows: a skewed sample
    bca = stats.bca_ratio_of_sums(numer, tokens, replicates=500, seed=0)
    gate = stats.studentized_ratio_of_sums(numer, tokens, replicates=500, seed=0)
    assert gate.estimate == bca.estimate and gate.method == bca.method
    assert gate.low <= bca.low and gate.high >= bca.high
    assert gate.high > bca.high and gate.bounds_from[1] in ("studentized", "student_t")
    assert stats.paired_log_loss(base, base + numer, tokens, replicates=500,
                                 seed=0).delta == gate


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


def test_block_size_does_not_change_the_interval(monkeypatch):
    """Resampling in memory-bounded blocks draws the same index stream as one block, so
    `verify` recomputes identical numbers whatever the block size."""
    base, subj, tokens = _windows(7, n=50)
    whole = stats.bca_ratio_of_sums(subj - base, tokens, replicates=64, seed=3)
    for block in (50 * 8, 50 * 7 + 3, 50):
        monkeypatch.setattr(stats, "_BLOCK_INTEGERS", block)
        assert stats.bca_ratio_of_sums(subj - base, tokens, replicates=64, seed=3) == whole


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
