"""How often the gate's upper bound misses the truth, by simulation (pure numpy).

The perplexity gate passes when the upper end of the (1 − α) interval of Δ̄ is below
log(limit), so what must hold is one-sided: over repeated runs on a population whose true Δ̄
is known, the upper bound lies below the truth at most α/2 of the time. `miss_rates` draws
many runs of n windows from a population and computes, for all of them at once, the upper
bound of `invarlock.stats.bca_ratio_of_sums` (BCa alone) and of
`invarlock.stats.studentized_ratio_of_sums` (what the gate uses: BCa widened to the farthest
of the bootstrap-t, Student-t and Hall's skewness-corrected bounds) by the same rules. Runs are
processed in chunks that share one matrix of resampling counts (B × n): each run's bootstrap
is then a matrix product, and each run still gets an independent-of-its-data resample, which
is all a coverage estimate needs. `tests/test_stats.py` checks that these vectorised bounds
equal the library's for the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri, stdtrit

from invarlock.stats import expanded_alpha, hall_transform

# A population draws `runs` data sets of n windows: (numer [runs, n], denom [runs, n], truth).
Population = Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray, float]]


def count_matrix(indices: np.ndarray, n: int) -> np.ndarray:
    """[B, n] how often each window appears in each replicate, from [B, n] indices."""
    counts = np.zeros((indices.shape[0], n), dtype=np.float64)
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    np.add.at(counts, (rows, indices.ravel()), 1.0)
    return counts


def upper_bounds(numer: np.ndarray, denom: np.ndarray, counts: np.ndarray,
                 alpha: float) -> dict[str, np.ndarray]:
    """{"bca": [runs], "gate": [runs]}: each run's upper bound under both rules."""
    n = numer.shape[1]
    replicates = counts.shape[0]
    estimate = numer.sum(axis=1) / denom.sum(axis=1)
    sum_w = counts @ denom.T  # [B, runs]
    theta = (counts @ numer.T) / sum_w
    bca = _bca_upper(numer, denom, theta, estimate, alpha)
    scale = np.sqrt(n / (n - 1.0))
    se = scale * np.sqrt(((numer - estimate[:, None] * denom) ** 2).sum(axis=1)) / denom.sum(
        axis=1)
    tiny = 1e-9 * np.abs(numer / denom).max(axis=1)
    ss = (counts @ (numer**2).T - 2.0 * theta * (counts @ (numer * denom).T)
          + theta**2 * (counts @ (denom**2).T))
    se_star = scale * np.sqrt(np.maximum(ss, 0.0)) / sum_w
    with np.errstate(divide="ignore", invalid="ignore"):
        t_star = np.where(se_star > tiny, (theta - estimate) / se_star,
                          np.sign(theta - estimate) * np.inf)
    t_star = np.sort(np.nan_to_num(t_star, nan=0.0), axis=0)
    k = max(0, int(np.floor(alpha / 2.0 * replicates)) - 1)
    boot_t = estimate - t_star[k] * se
    boot_t_low = estimate - t_star[replicates - 1 - k] * se
    t_crit = float(stdtrit(n - 1.0, 1.0 - alpha / 2.0))
    student = estimate + t_crit * se
    widened = np.maximum(bca, student)
    finite = np.isfinite(boot_t) & np.isfinite(boot_t_low)
    widened = np.where(finite, np.maximum(widened, boot_t), widened)
    centred = numer - estimate[:, None] * denom
    m2 = (centred**2).mean(axis=1)
    gamma = np.where(m2 > 0, (centred**3).mean(axis=1) / np.maximum(m2, 1e-300) ** 1.5, 0.0)
    widened = np.maximum(widened, estimate - _hall_inverse(-t_crit, gamma, n) * se)
    s3 = (counts @ (numer**3).T - 3.0 * theta * (counts @ (numer**2 * denom).T)
          + 3.0 * theta**2 * (counts @ (numer * denom**2).T) - theta**3 * (counts @ (denom**3).T))
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma_star = np.where(ss > 0, (s3 / n) / np.maximum(ss / n, 1e-300) ** 1.5, 0.0)
        h_star = np.where(se_star > tiny, hall_transform((theta - estimate) / se_star,
                                                          gamma_star, n), np.nan)
    usable = np.all(np.isfinite(h_star), axis=0)
    h_low = np.sort(np.where(np.isfinite(h_star), h_star, 0.0), axis=0)[k]
    hall_boot = estimate - _hall_inverse(h_low, gamma, n) * se
    widened = np.where(usable, np.maximum(widened, hall_boot), widened)
    degenerate = (np.ptp(theta, axis=0) == 0.0) | (se <= tiny)
    gate = np.where(degenerate, bca, widened)
    return {"bca": bca, "gate": gate}


def _hall_inverse(y: np.ndarray | float, gamma: np.ndarray, n: int) -> np.ndarray:
    """`stats.hall_inverse`, elementwise over runs."""
    a = gamma / (3.0 * np.sqrt(n))
    safe = np.where(np.abs(a) < 1e-12, 1.0, a)
    return np.where(np.abs(a) < 1e-12, y - a / 2.0,
                    (np.cbrt(1.0 + 3.0 * a * (y - a / 2.0)) - 1.0) / safe)


def _bca_upper(numer: np.ndarray, denom: np.ndarray, theta: np.ndarray, estimate: np.ndarray,
               alpha: float) -> np.ndarray:
    """BCa upper bound per run, as `stats.bca_ratio_of_sums` computes it."""
    replicates = theta.shape[0]
    n = numer.shape[1]
    below = (theta < estimate).sum(axis=0) + 0.5 * (theta == estimate).sum(axis=0)
    share = below / replicates
    loo = (numer.sum(axis=1, keepdims=True) - numer) / (denom.sum(axis=1, keepdims=True) - denom)
    dev = loo.mean(axis=1, keepdims=True) - loo
    ss = (dev**2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        accel = np.where(ss > 0, (dev**3).sum(axis=1) / (6.0 * ss**1.5), 0.0)
    level = expanded_alpha(alpha, n)
    z_alpha = ndtri(1.0 - level / 2.0)
    inside = (share > 0.0) & (share < 1.0)
    z0 = ndtri(np.where(inside, share, 0.5))
    shifted = z0 + z_alpha
    q = np.where(inside, ndtr(z0 + shifted / (1.0 - accel * shifted)), 1.0 - level / 2.0)
    ordered = np.sort(theta, axis=0)
    pos = q * (replicates - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, replicates - 1)
    cols = np.arange(theta.shape[1])
    upper = ordered[lo, cols] + (pos - lo) * (ordered[hi, cols] - ordered[lo, cols])
    upper = np.where(np.ptp(theta, axis=0) == 0.0, estimate, upper)
    return np.maximum(upper, estimate)


@dataclass(frozen=True)
class MissRate:
    """Share of simulated runs whose upper bound lay below the true Δ̄, per rule."""

    runs: int
    windows: int
    replicates: int
    alpha: float
    bca: float
    gate: float

    @property
    def nominal(self) -> float:
        """The upper end of a two-sided (1 − α) interval is a one-sided 1 − α/2 bound."""
        return self.alpha / 2.0

    def mc_error(self, rate: float | None = None) -> float:
        """Monte-Carlo standard error of a miss rate at the nominal level (or `rate`)."""
        p = self.nominal if rate is None else rate
        return float(np.sqrt(p * (1.0 - p) / self.runs))

    def holds(self, rate: float) -> bool:
        """Within two Monte-Carlo standard errors of the nominal level, or below it."""
        return rate <= self.nominal + 2.0 * self.mc_error()


def miss_rates(population: Population, *, windows: int, runs: int, replicates: int,
               alpha: float = 0.05, seed: int = 0, chunk: int = 250) -> MissRate:
    """Simulate `runs` runs of `windows` windows; count upper-bound misses per rule."""
    rng = np.random.default_rng(seed)
    missed = {"bca": 0, "gate": 0}
    for start in range(0, runs, chunk):
        size = min(chunk, runs - start)
        numer, denom, truth = population(rng, size, windows)
        counts = count_matrix(rng.integers(0, windows, size=(replicates, windows)), windows)
        for rule, bound in upper_bounds(numer, denom, counts, alpha).items():
            missed[rule] += int(np.count_nonzero(bound < truth))
    return MissRate(runs, windows, replicates, alpha, missed["bca"] / runs,
                    missed["gate"] / runs)


def resampled(delta: np.ndarray, tokens: np.ndarray) -> Population:
    """Windows drawn with replacement from a real population; truth = its own Δ̄."""
    truth = float(delta.sum() / tokens.sum())

    def draw(rng: np.random.Generator, runs: int, n: int):
        idx = rng.integers(0, delta.size, size=(runs, n))
        return delta[idx], tokens[idx], truth
    return draw


def synthetic(kind: str, *, mean: float, sd: float, tokens: int = 127,
              damage_share: float = 0.03, damage: float = 0.5) -> Population:
    """Per-token deltas with known mean: "t3" (Student t, 3 df: heavy symmetric tails),
    "lognormal" (σ 0.75, skewness 3.3), "sparse" (normal noise, and `damage` nats/token
    added to a `damage_share` of windows). `sd` is the per-window standard deviation of the
    t3 and lognormal deltas and of the sparse noise."""
    sigma = 0.75

    def draw(rng: np.random.Generator, runs: int, n: int):
        if kind == "t3":
            per = mean + sd / np.sqrt(3.0) * rng.standard_t(3, size=(runs, n))
            truth = mean
        elif kind == "lognormal":
            m, v = np.exp(sigma**2 / 2), (np.exp(sigma**2) - 1) * np.exp(sigma**2)
            per = mean + sd * (rng.lognormal(0.0, sigma, size=(runs, n)) - m) / np.sqrt(v)
            truth = mean
        elif kind == "sparse":
            hit = rng.random((runs, n)) < damage_share
            per = rng.normal(mean, sd, size=(runs, n)) + damage * hit
            truth = mean + damage * damage_share
        else:
            raise ValueError(f"unknown population kind {kind!r}")
        return per * tokens, np.full((runs, n), float(tokens)), truth
    return draw
