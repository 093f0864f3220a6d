"""Distribution evidence: how far the subject's next-token distribution moved from the
baseline's, token by token. Pure numpy, no torch, no I/O.

Perplexity is a geometric mean in which token errors cancel; the people who ship quantized
checkpoints compare a quant with its original by the per-token KL divergence and by how often
the top token changes. The numbers here are named as llama.cpp's
`llama-perplexity --kl-divergence` names them (mean, median, 90/95/99/99.9% and maximum KLD,
"same top p", Δp of the target token), with one difference: the interval on mean KLD and on
the agreement is a paired BCa bootstrap over windows (`invarlock.stats`), not a standard
error that treats tokens as independent.

The baseline's distribution at each scored token is kept compactly (`CompactDistribution`):
its top-k log-probabilities, the log of the mass outside them (the tail) and the target
token's log-probability (k = 64: 520 bytes per token in memory, about 700 in the cache).
By the chain rule, KL(P ‖ Q) = Σ_top p log(p/q) + p_T log(p_T/q_T) + p_T·KL(P_T ‖ Q_T):
the first two terms are exact from the compact form and the subject's logits; the third,
the divergence inside the tail (which the compact form cannot see), is estimated by the
divergence inside the top-k renormalised, p_T·KL(P_top ‖ Q_top). Dropping it (treating the
tail as one outcome) understates mean KLD by 16-17% at k = 64 on the demo model; with it the
estimate is within 1% of the exact full-vocabulary value (tests/test_distribution.py).

Per scored token: KLD = KL(baseline ‖ subject) = Σ p log(p / q), the reverse KL(subject ‖
baseline), whether the subject's top token is the baseline's, and Δp = q(target) −
p(target). Per window the sums of these are stored (`WindowDistribution`), so `verify` can
recompute the means, the RMS of Δp and both intervals; percentiles need every token and are
recorded, not recomputed. A histogram of log10 KLD is stored for the plot.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from invarlock.distribution_gate import Limits, checks
from invarlock.stats import BootstrapInterval, bca_ratio_of_sums

TOP_K = 64                  # baseline log-probabilities kept per scored token (see module doc)
# Smallest tail mass kept. A float32 log-partition is good to ~1e-7 relative, so a tail
# computed as 1 - sum(top-k) below ~1e-6 is noise; flooring both sides there keeps that
# noise (up to ~1e-5 nats per token otherwise) out of KLD.
TAIL_FLOOR = 1e-6
KLD_PERCENTILES = {"median": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99_9": 99.9}
DELTA_P_PERCENTILES = {"p0_1": 0.1, "p1": 1.0, "p5": 5.0, "p10": 10.0, "p25": 25.0,
                       "median": 50.0, "p75": 75.0, "p90": 90.0, "p95": 95.0, "p99": 99.0,
                       "p99_9": 99.9}
HISTOGRAM_LOG10 = (-6.0, 2.0, 32)  # log10 KLD bins: first edge, last edge, bins
WINDOW_FIELDS = ("kld", "kld_reverse", "same_top", "delta_p", "delta_p_sq")


@dataclass(frozen=True)
class CompactDistribution:
    """A model's next-token distribution at every scored token of a window set, compactly.

    Rows are window-major, in the window set's order; `tokens[i]` rows belong to window
    `window_ids[i]`. ≤ 8·k + 8 bytes per scored token, whatever the vocabulary."""

    window_ids: np.ndarray   # int64 [N]
    tokens: np.ndarray       # int64 [N] scored tokens per window (rows)
    top_ids: np.ndarray      # int32 [M, k] most probable token ids, the most probable first
    top_logp: np.ndarray     # float32 [M, k] their log-probabilities
    tail_logp: np.ndarray    # float32 [M] log of the probability outside top_ids
    target_logp: np.ndarray  # float32 [M] log-probability of the token that came next

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    def rows_of(self, window_ids: np.ndarray) -> np.ndarray:
        """Row indices of the given windows, in the order given (any subset of the set)."""
        starts = np.concatenate([[0], np.cumsum(self.tokens)[:-1]]).astype(np.int64)
        where = {int(w): i for i, w in enumerate(self.window_ids)}
        missing = [int(w) for w in window_ids if int(w) not in where]
        if missing:
            raise ValueError(f"window {missing[0]} has no stored baseline distribution")
        picked = [np.arange(starts[where[int(w)]], starts[where[int(w)]] + self.tokens[
            where[int(w)]]) for w in window_ids]
        return np.concatenate(picked) if picked else np.zeros(0, np.int64)

    def to_json(self) -> dict[str, Any]:
        """The cache's form: arrays as base64 of their little-endian bytes."""
        return {"k": self.k, "window_ids": [int(w) for w in self.window_ids],
                "tokens": [int(n) for n in self.tokens],
                "top_ids": _b64(self.top_ids, "<i4"), "top_logp": _b64(self.top_logp, "<f4"),
                "tail_logp": _b64(self.tail_logp, "<f4"),
                "target_logp": _b64(self.target_logp, "<f4")}

    @classmethod
    def from_json(cls, data: Any) -> CompactDistribution:
        """Inverse of `to_json`; ValueError when the parts do not fit together."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        k = int(data["k"])
        tokens = np.asarray(data["tokens"], dtype=np.int64)
        window_ids = np.asarray(data["window_ids"], dtype=np.int64)
        rows = int(tokens.sum())
        if k < 1 or tokens.shape != window_ids.shape or (tokens < 0).any():
            raise ValueError("bad k, tokens or window_ids")
        out = cls(window_ids, tokens, _unb64(data["top_ids"], "<i4", (rows, k)),
                  _unb64(data["top_logp"], "<f4", (rows, k)),
                  _unb64(data["tail_logp"], "<f4", (rows,)),
                  _unb64(data["target_logp"], "<f4", (rows,)))
        if not (np.isfinite(out.top_logp).all() and np.isfinite(out.tail_logp).all()
                and np.isfinite(out.target_logp).all()):
            raise ValueError("non-finite log-probabilities")
        return out


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _unb64(text: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ValueError("array of the wrong size")
    return np.frombuffer(raw, dtype=dtype).astype(dtype[1:] if dtype[0] == "<" else dtype) \
        .reshape(shape)


@dataclass(frozen=True)
class TokenComparison:
    """Subject against baseline at every scored token (rows as in `CompactDistribution`)."""

    window_ids: np.ndarray   # int64 [N]
    tokens: np.ndarray       # int64 [N]
    kld: np.ndarray          # float64 [M] KL(baseline ‖ subject), nats
    kld_reverse: np.ndarray  # float64 [M] KL(subject ‖ baseline), nats
    same_top: np.ndarray     # bool [M] the subject's most probable token is the baseline's
    delta_p: np.ndarray      # float64 [M] q(target) − p(target)

    def per_window(self) -> WindowDistribution:
        """Per-window sums: what the certificate stores and `verify` recomputes from."""
        owner = np.repeat(np.arange(self.tokens.shape[0]), self.tokens)
        n = self.tokens.shape[0]

        def sums(values: np.ndarray) -> np.ndarray:
            return np.bincount(owner, weights=values.astype(np.float64), minlength=n)

        return WindowDistribution(self.window_ids.copy(), self.tokens.copy(), sums(self.kld),
                                  sums(self.kld_reverse), sums(self.same_top),
                                  sums(self.delta_p), sums(self.delta_p ** 2))


@dataclass(frozen=True)
class WindowDistribution:
    """Per window: token count and the sums of each per-token quantity."""

    window_ids: np.ndarray
    tokens: np.ndarray
    kld: np.ndarray
    kld_reverse: np.ndarray
    same_top: np.ndarray
    delta_p: np.ndarray
    delta_p_sq: np.ndarray

    def as_dict(self) -> dict[str, list[Any]]:
        return {"ids": [int(w) for w in self.window_ids],
                "tokens": [int(n) for n in self.tokens],
                **{f: [float(v) for v in getattr(self, f)] for f in WINDOW_FIELDS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowDistribution:
        arrays = [np.asarray(data[f], dtype=np.float64) for f in WINDOW_FIELDS]
        return cls(np.asarray(data["ids"], dtype=np.int64),
                   np.asarray(data["tokens"], dtype=np.int64), *arrays)


def recomputable(windows: WindowDistribution, *, replicates: int, seed: int,
                 alpha: float) -> dict[str, Any]:
    """Everything that follows from the per-window sums alone (what `verify` recomputes)."""
    tokens = windows.tokens.astype(np.float64)
    if tokens.sum() <= 0:
        raise ValueError("no scored tokens")
    total = float(tokens.sum())
    kld = bca_ratio_of_sums(windows.kld, tokens, replicates=replicates, seed=seed, alpha=alpha)
    top = bca_ratio_of_sums(windows.same_top, tokens, replicates=replicates, seed=seed,
                            alpha=alpha)
    return {"tokens": int(total),
            "kld_mean": _interval(kld),
            "kld_reverse_mean": float(windows.kld_reverse.sum() / total),
            "same_top_p": _interval(top),
            "delta_p_mean": float(windows.delta_p.sum() / total),
            "delta_p_rms": float(np.sqrt(max(windows.delta_p_sq.sum() / total, 0.0)))}


def summarize(comparison: TokenComparison, *, set_name: str, top_k: int, limits: Limits,
              replicates: int, seed: int, alpha: float) -> dict[str, Any]:
    """The certificate's `distribution` section from the per-token comparison."""
    windows = comparison.per_window()
    core = recomputable(windows, replicates=replicates, seed=seed, alpha=alpha)
    kld, rev, dp = comparison.kld, comparison.kld_reverse, comparison.delta_p
    kld_points = {**_percentiles(kld, KLD_PERCENTILES), "max": float(kld.max())}
    return {
        "set": set_name, "top_k": top_k,
        "bootstrap": {"replicates": replicates, "seed": seed, "alpha": alpha},
        **core,
        "kld": kld_points,
        "kld_reverse": {**_percentiles(rev, KLD_PERCENTILES), "max": float(rev.max())},
        "delta_p": {"min": float(dp.min()), **_percentiles(dp, DELTA_P_PERCENTILES),
                    "max": float(dp.max())},
        "histogram": histogram(kld),
        "limits": limits.as_dict(),
        "checks": checks({**core, "kld": kld_points}, limits),
        "windows": windows.as_dict(),
    }


def histogram(kld: np.ndarray) -> dict[str, Any]:
    """Counts of log10 KLD in fixed bins; values below the first edge (exact agreement
    included) and above the last are counted apart, so the counts add up to the tokens."""
    lo, hi, bins = HISTOGRAM_LOG10
    edges = np.linspace(lo, hi, bins + 1)
    with np.errstate(divide="ignore"):
        logs = np.log10(np.asarray(kld, dtype=np.float64))
    counts, _ = np.histogram(logs[(logs >= lo) & (logs <= hi)], bins=edges)
    return {"log10_edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "below": int(np.count_nonzero(logs < lo)), "above": int(np.count_nonzero(logs > hi))}


def _interval(ci: BootstrapInterval) -> dict[str, Any]:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "method": ci.method}


def _percentiles(values: np.ndarray, which: dict[str, float]) -> dict[str, float]:
    points = np.percentile(np.asarray(values, dtype=np.float64), list(which.values()))
    return {name: float(v) for name, v in zip(which, points, strict=True)}

