"""The sequential test: its boundary is the mixture boundary it claims to be, and stopping at
the first deciding look keeps the false-pass rate at α where a naive repeated test does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from invarlock import sequential as sq

ALPHA = 0.05
N_MIN, N_MAX, STEP = 25, 200, 10


def _mixture_by_quadrature(s: float, t: int, rho: float) -> float:
    """M_t(s) integrated numerically over the half-normal mixing density (independent of the
    closed form the module uses)."""
    def integrand(lam: float) -> float:
        return math.exp(lam * s - lam * lam * t / 2.0) * 2.0 * stats.norm.pdf(lam, scale=rho)
    value, _ = integrate.quad(integrand, 0.0, np.inf, limit=200)
    return value


@pytest.mark.parametrize("t", [2, 25, 60, 200, 1000])
@pytest.mark.parametrize("alpha", [0.01, 0.025, 0.05])
def test_boundary_is_where_the_mixture_reaches_one_over_alpha(t, alpha):
    rho = sq.mixing_rho(alpha, 25)
    b = sq.boundary(t, alpha, rho)
    assert _mixture_by_quadrature(b, t, rho) == pytest.approx(1.0 / alpha, rel=1e-6)
    assert _mixture_by_quadrature(0.98 * b, t, rho) < 1.0 / alpha


def test_boundary_grows_slower_than_linearly_and_faster_than_a_fixed_z():
    rho = sq.mixing_rho(ALPHA, N_MIN)
    b = np.array([sq.boundary(t, ALPHA, rho) for t in (25, 100, 400, 1600)])
    z = stats.norm.ppf(1 - ALPHA) * np.sqrt([25, 100, 400, 1600])
    assert np.all(b > z)  # the price of looking at every t
    assert np.all(np.diff(b / np.sqrt([25, 100, 400, 1600])) > 0)  # log-log growth
    assert b[-1] / 1600 < b[0] / 25  # the interval still shrinks


def _false_pass_rate(draw, decide_pass, runs: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([decide_pass(draw(rng)) for _ in range(runs)]))


def _sequential_pass(x: np.ndarray) -> bool:
    looks = sq.look_schedule(N_MIN, N_MAX, STEP)
    return sq.decide(x, looks, threshold=0.0, alpha=ALPHA, n_min=N_MIN).decision is sq.Decision.PASS


def _naive_pass(x: np.ndarray) -> bool:
    """A one-sided t-interval recomputed at every look: valid at one look, not at many."""
    for t in sq.look_schedule(N_MIN, N_MAX, STEP):
        head = x[:t]
        high = head.mean() + stats.t.ppf(1 - ALPHA, t - 1) * head.std(ddof=1) / math.sqrt(t)
        if high < 0.0:
            return True
    return False


DRAWS = {
    "normal": lambda rng: rng.standard_normal(N_MAX),
    "student_t3": lambda rng: rng.standard_t(3, N_MAX),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_false_pass_rate_at_the_limit_is_at_most_alpha(name):
    """A subject exactly at the limit (mean difference = threshold) passes at most α of the time
    (1,000 runs: the Monte-Carlo error of a 5% rate is 0.7 points)."""
    rate = _false_pass_rate(DRAWS[name], _sequential_pass, 1000, seed=11)
    assert rate <= ALPHA + 0.015


def test_a_naive_repeated_fixed_test_exceeds_alpha_on_the_same_runs():
    """The simulation can tell a valid boundary from an invalid one."""
    rate = _false_pass_rate(DRAWS["normal"], _naive_pass, 1000, seed=11)
    assert rate > 2 * ALPHA


def test_clear_cases_stop_at_the_first_look():
    rng = np.random.default_rng(3)
    looks = sq.look_schedule(N_MIN, N_MAX, STEP)
    good = sq.decide(rng.normal(-0.5, 0.1, N_MAX), looks, threshold=0.0, alpha=ALPHA,
                     n_min=N_MIN)
    bad = sq.decide(rng.normal(0.5, 0.1, N_MAX), looks, threshold=0.0, alpha=ALPHA, n_min=N_MIN)
    assert (good.decision, good.stopped_at) == (sq.Decision.PASS, N_MIN)
    assert (bad.decision, bad.stopped_at) == (sq.Decision.FAIL, N_MIN)
    assert good.looks[-1].high < 0.0 < bad.looks[-1].low


def test_a_borderline_case_runs_to_the_maximum_undecided():
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, N_MAX)
    result = sq.decide(x - x.mean(), sq.look_schedule(N_MIN, N_MAX, STEP), threshold=0.0,
                       alpha=ALPHA, n_min=N_MIN)
    assert result.decision is sq.Decision.CONTINUE and result.stopped_at == N_MAX


def test_pass_waits_for_n_min_but_fail_does_not():
    x = np.full(N_MAX, -1.0) + np.random.default_rng(5).normal(0, 1e-3, N_MAX)
    result = sq.decide(x, (10, 20, N_MIN, 40), threshold=0.0, alpha=ALPHA, n_min=N_MIN)
    assert result.stopped_at == N_MIN
    assert [look.decision for look in result.looks[:2]] == [sq.Decision.CONTINUE] * 2
    fail = sq.decide(-x, (10, 20, N_MIN), threshold=0.0, alpha=ALPHA, n_min=N_MIN)
    assert (fail.decision, fail.stopped_at) == (sq.Decision.FAIL, 10)


@pytest.mark.parametrize("looks, message", [((), "at least one"), ((30, 30), "increasing"),
                                            ((1, 30), "lie in"), ((30, 999), "lie in")])
def test_bad_looks_are_named(looks, message):
    with pytest.raises(ValueError, match=message):
        sq.decide(np.zeros(N_MAX), looks, threshold=0.0, alpha=ALPHA, n_min=N_MIN)
