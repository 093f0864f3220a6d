"""The pre-registered design: its α split, its floor on σ̂ (from the preview windows it
scores) and its looks keep the false-pass rate of a subject exactly at the limit under the
boundary's α, for normal, heavy-tailed, skewed, partly damaged and real (demo model)
per-window differences; a naive repeated fixed-sample test fails the same simulation;
borderline power stays within 6 points of the fixed design; and damage too rare for the
windows an early stop has seen passes no more often than it goes unseen."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from invarlock import sequential as sq
from invarlock import sequential_run as sr
from invarlock.enums import MetricKind

DATA = Path(__file__).parent / "data" / "sequential_demo_differences.json"
CI = sq.Design(alpha=0.05, n_min=32, n_max=200, step=16, share=0.2, preview_n=32)
RUNS = 2000


def _real(name: str):
    """Resampled per-window differences of a real run, centred: a subject exactly at the
    limit with the real shape (skew, tails) of the demo model's differences."""
    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        diffs = np.asarray(json.loads(DATA.read_text())["differences"][name], dtype=float)
        return rng.choice(diffs - diffs.mean(), n, replace=True)
    return draw


DRAWS = {
    "normal": lambda rng, n: rng.standard_normal(n),
    "student_t3": lambda rng, n: rng.standard_t(3, n),
    # strong right skew: mean 0, a long tail of windows much worse than the rest
    "lognormal": lambda rng, n: rng.lognormal(0.0, 1.0, n) - math.exp(0.5),
    # damage confined to 10% of the windows: 3 of the first 32 on average, none in 3.4%
    "rare_damage": lambda rng, n: (np.where(rng.random(n) < 0.10, 3.0, 0.0)
                                   + rng.normal(0.0, 0.3, n) - 0.3),
    "demo_int8": _real("int8"),
    "demo_rtn4": _real("rtn4"),
}


def _pass_rate(draw, design: sq.Design, *, floor: bool, runs: int = RUNS, seed: int = 7) -> float:
    """Share of runs at the limit (mean difference = threshold 0) that the sequence passes;
    the σ̂ floor comes from the preview windows the design scores, as in a run."""
    rng = np.random.default_rng(seed)
    passed = 0
    for _ in range(runs):
        x, preview = draw(rng, design.n_max), draw(rng, design.preview_n or design.n_max)
        sd_floor = _floor(preview) if floor else 0.0
        passed += design.run(x, threshold=0.0, sd_floor=sd_floor).decision is sq.Decision.PASS
    return passed / runs


def _floor(preview: np.ndarray) -> float:
    """The run's σ̂ floor from its preview differences (per-token values, one token each)."""
    ones = np.ones(preview.size)
    return sr.preview_floor(MetricKind.PPL_CAUSAL, ones, np.zeros(preview.size), preview)


def _allowed(alpha: float, runs: int = RUNS) -> float:
    """α plus three Monte-Carlo standard errors of a rate α over `runs` runs."""
    return alpha + 3.0 * math.sqrt(alpha * (1 - alpha) / runs)


def test_alpha_is_split_so_both_stages_together_keep_the_fixed_design_rate():
    assert CI.alpha_boundary == pytest.approx(0.005)
    assert CI.alpha_fixed == pytest.approx(0.04)
    # one-sided false pass: the boundary's PASS side plus the fixed interval's upper tail
    assert CI.alpha_boundary + CI.alpha_fixed / 2 == pytest.approx(CI.alpha / 2)


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_false_pass_rate_at_the_limit_is_at_most_the_boundary_alpha(name):
    assert _pass_rate(DRAWS[name], CI, floor=True) <= _allowed(CI.alpha_boundary)


@pytest.mark.parametrize("name", ["lognormal", "rare_damage"])
def test_without_the_preview_floor_skew_and_rare_damage_pass_too_often(name):
    """Why the design floors σ̂: the asymptotic sequence alone under-covers these at 32."""
    assert _pass_rate(DRAWS[name], CI, floor=False, runs=1000) > 4 * CI.alpha_boundary


def test_damage_too_rare_for_an_early_stop_to_see_passes_no_more_often_than_it_goes_unseen():
    """The price of deciding on few windows, which no boundary avoids: damage in 3% of the
    windows is absent from all preview_n + n_min windows of a first look with probability
    0.97^64 = 14%. The floor keeps the pass rate to that; without it, it is far above."""
    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.where(rng.random(n) < 0.03, 10.0, 0.0) + rng.normal(0.0, 0.3, n) - 0.3

    unseen = 0.97 ** (CI.preview_n + CI.n_min)
    assert _pass_rate(draw, CI, floor=True) <= unseen + 3 * math.sqrt(unseen / RUNS)
    assert _pass_rate(draw, CI, floor=False, runs=1000) > 2 * unseen


def test_a_naive_repeated_fixed_test_in_place_of_the_boundary_fails_the_simulation(monkeypatch):
    """The same simulation with z·√t (a fixed-sample test at every look) as the boundary;
    without the σ̂ floor, so that the boundary alone is compared."""
    assert _pass_rate(DRAWS["normal"], CI, floor=False) <= _allowed(CI.alpha_boundary)
    z = stats.norm.ppf(1 - CI.alpha_boundary)
    monkeypatch.setattr(sq, "boundary", lambda t, alpha, rho: z * math.sqrt(t))
    assert _pass_rate(DRAWS["normal"], CI, floor=False) > 2 * _allowed(CI.alpha_boundary)


def _fixed_pass(x: np.ndarray, alpha: float) -> bool:
    """The fixed design at the maximum: upper bound of a 1 − α interval below the limit (the
    t interval stands in for BCa, which it matches on normal data, to keep this fast)."""
    n = len(x)
    return bool(x.mean() + stats.t.ppf(1 - alpha / 2, n - 1) * x.std(ddof=1) / math.sqrt(n) < 0)


def _design_pass(x: np.ndarray, preview: np.ndarray, design: sq.Design) -> bool:
    result = design.run(x, threshold=0.0, sd_floor=_floor(preview))
    if result.decision is sq.Decision.CONTINUE:
        return _fixed_pass(x, design.alpha_fixed)
    return result.decision is sq.Decision.PASS


def test_the_whole_design_keeps_the_fixed_designs_false_pass_rate():
    rng = np.random.default_rng(8)
    rate = np.mean([_design_pass(rng.standard_normal(200), rng.standard_normal(CI.preview_n), CI)
                    for _ in range(RUNS)])
    assert rate <= _allowed(CI.alpha / 2)


@pytest.mark.parametrize("effect", [2.0, 2.8, 3.5])  # standard errors below the limit at 200
def test_power_on_borderline_subjects_is_within_six_points_of_the_fixed_design(effect):
    """Fixed design against the sequential design (with its 32-window preview floor) on the
    same simulated subjects; the gap is asserted, not printed."""
    rng = np.random.default_rng(9)
    fixed = design = 0
    for _ in range(RUNS):
        x = rng.standard_normal(200) - effect / math.sqrt(200)
        fixed += _fixed_pass(x, CI.alpha)
        design += _design_pass(x, rng.standard_normal(CI.preview_n), CI)
    assert (fixed - design) / RUNS <= 0.06


def test_clear_cases_decide_at_the_first_look_and_the_design_reaches_later_looks_only():
    rng = np.random.default_rng(10)
    good = CI.run(rng.normal(-0.5, 0.1, 40), threshold=0.0, sd_floor=0.1)
    assert (good.decision, good.stopped_at) == (sq.Decision.PASS, CI.n_min)
    assert [look.windows for look in CI.run(np.zeros(70) + rng.normal(0, 1, 70),
                                            threshold=0.0).looks] == [32, 48, 64]
    assert CI.next_look(0) == 32 and CI.next_look(32) == 48 and CI.next_look(200) == 200


def test_the_floor_only_widens_the_interval():
    x = np.random.default_rng(11).normal(0.0, 1.0, 64)
    plain, floored = CI.run(x, threshold=0.0), CI.run(x, threshold=0.0, sd_floor=5.0)
    assert all(f.radius >= p.radius for p, f in zip(plain.looks, floored.looks, strict=True))
    assert floored.sd_floor == 5.0


@pytest.mark.parametrize("kwargs, message", [
    ({"share": 1.0}, "share"), ({"alpha": 0.0}, "alpha"), ({"n_min": 1}, "n_min"),
    ({"n_min": 300}, "n_min <= n_max"), ({"step": 0}, "step")])
def test_bad_designs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sq.Design(**{"alpha": 0.05, "n_min": 32, "n_max": 200, "step": 16, **kwargs})


def test_a_run_short_of_the_first_look_is_refused():
    with pytest.raises(ValueError, match="first look"):
        CI.run(np.zeros(10), threshold=0.0)
