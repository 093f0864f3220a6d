"""RMT guard: did the outlier structure of the subject's activations move away from the
baseline's?

For a module's output on the calibration windows, Y (m sampled token rows × n features) is
centred and scaled and compared with the Marchenko–Pastur edge (Marchenko & Pastur 1967): a
matrix of i.i.d. unit-variance entries has no singular value much above √m + √n. A singular
value beyond that edge is an *outlier*: a direction of structure (an outlier feature, a
dominant token pattern) rather than noise. The guard counts outliers, per family, in the
baseline and in the subject on exactly the same token rows.

Why counts: real LLMs carry a few *massive activations* (particular features of particular
down-projections, on particular tokens). Such a row makes one singular value huge, and any
statistic of its size (σ_max, an edge ratio) moves by a large factor when a benign edit nudges
that one activation. A count moves by one at most for it; new outlier directions — blown-up
weight rows, a layer computing something else — add to the count.

Standardisation: Ỹ = (Y − column means) / s with ONE scale s, the median over features of
their standard deviations: a handful of outlier features cannot move it, and for i.i.d.
entries it is the common σ, so the edge keeps its Marchenko–Pastur meaning. (Unit variance
per column would shrink outlier features back to the bulk and hide them.)

Null margin: what a benign edit can do to a count is move singular values that sit near
the edge across it; values far from it do not cross. So the paired null of a module's excess
Δ_m = Σ_g (S_g − B_g) (summed over the G window groups, outliers added or, < 0, lost) is
modelled as having variance τ²·(N_m + 1), N_m the number of its normalised singular values
(baseline and subject, every group) within `edge_band` of the edge. τ is calibrated on the
paired null of benign edits (per run the larger of an upper 95% bound on the mean square,
`null_scale`, and the scale under which every module of the run is within its margin,
`covering_scale`; the largest over the runs: RTN 8- and 4-bit, pruning, half precision,
AWQ/SmoothQuant/SmoothAttention rescalings; see policies/CALIBRATION.md). Every module and
every family is one test; with T tests and a per-run false-alarm target α
(`false_alarm_rate`), each is held at Bonferroni's two-sided level α/T. Crossings are
rare whole events, so Δ is taken as the difference of two Poisson counts (Skellam), not as
normal: with Q(v) the smallest k such that P(|Δ| > k) ≤ α/T when Var Δ = v,

    module   |Δ_m| ≤ Q(τ²·(N_m + 1))
    family   |Σ_m Δ_m| ≤ Q(τ²·Σ_m (N_m + 1)) + ε_f·Σ_m B_m

so the chance that a benign edit fails any of the ~200 module tests of a 30-layer model is
at most α under the model (the test suite checks it on simulated null runs). The family
sum catches a change spread thinly over many modules; ε_f is its slack for edits that move
every module a little in the same direction. A non-finite spectrum always fails. The guard
passes iff no module and no family is beyond its margin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import chdtri, ive

from invarlock.guards.base import BuiltinGuard, GuardDecision, Stage, unmeasured_decision

NAME = "rmt"
FLAG = "rmt_stable"
FAMILIES = ("attn", "ffn", "embed", "other")
# Normalised singular values kept per module and group: those above this fraction of the
# edge (the decision counts those above 1), at most `KEEP_VALUES` of them.
KEEP_ABOVE = 0.8
KEEP_VALUES = 48
DEFAULT_NULL_Z = 3.0
DEFAULT_EDGE_BAND = 0.10
DEFAULT_FALSE_ALARM_RATE = 0.01
NULL_CONFIDENCE = 0.95


def normalized_spectrum(gram: np.ndarray, column_variances: np.ndarray, m: int,
                        n: int) -> np.ndarray:
    """Singular values of the centred rows over s·(√m + √n), descending.

    `gram` is the Gram matrix of the centred rows (m×m or n×n; its eigenvalues are σ²),
    `column_variances` the n feature variances; s = sqrt(median variance), or the RMS scale
    when most features are constant. Non-finite input gives [inf]; a constant matrix [].
    """
    col_var = np.asarray(column_variances, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    if col_var.shape != (n,) or gram.shape not in ((m, m), (n, n)) or min(m, n) < 2:
        raise ValueError(f"inconsistent shapes: gram {gram.shape}, variances {col_var.shape}, "
                         f"m={m}, n={n}")
    if not (np.all(np.isfinite(col_var)) and np.all(np.isfinite(gram))):
        return np.array([np.inf])
    scale = float(np.sqrt(np.median(col_var)))
    if scale == 0.0:
        scale = float(np.sqrt(col_var.mean()))
        if scale == 0.0:
            return np.zeros(0)
    eig = np.linalg.eigvalsh(gram)[::-1]
    return np.sqrt(np.clip(eig, 0.0, None)) / scale / (math.sqrt(m) + math.sqrt(n))


def spectrum(y: np.ndarray) -> np.ndarray:
    """`normalized_spectrum` of a matrix of rows (tokens) × columns (features)."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or min(y.shape) < 2:
        raise ValueError(f"the spectrum needs a 2-D matrix with at least 2 rows and columns, "
                         f"got shape {y.shape}")
    m, n = y.shape
    yc = y - y.mean(axis=0)
    gram = yc @ yc.T if m <= n else yc.T @ yc
    return normalized_spectrum(gram, np.square(yc).mean(axis=0), m, n)


def kept(values: np.ndarray) -> list[float | None]:
    """The values stored in the certificate (None stands for a non-finite one)."""
    head = np.asarray(values[:KEEP_VALUES], dtype=np.float64)
    top = head[~np.isfinite(head) | (head > KEEP_ABOVE)].tolist()  # one pass, not per value
    return [round(v, 5) if math.isfinite(v) else None for v in top]


def outliers(values: Sequence[float | None]) -> int:
    """Singular values beyond the Marchenko–Pastur edge (a non-finite one counts)."""
    return sum(1 for v in values if v is None or v > 1.0)


def counts(groups: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([outliers(g) for g in groups], dtype=np.float64)


def margin(base_counts: np.ndarray, epsilon: float, null_z: float) -> tuple[float, float]:
    """(margin, spread) of the earlier rule that sized the margin from the baseline's
    window-to-window spread: ε·ΣB + null_z·sd_g(B)·√G + 1. Not the decision any more (3
    degrees of freedom of window content, no multiplicity control); kept for the calibration
    recipe's record of the null slack and as the reference the tests compare with."""
    b = np.asarray(base_counts, dtype=np.float64)
    spread = float(np.std(b, ddof=1)) if b.size > 1 else 0.0
    return epsilon * float(b.sum()) + null_z * spread * math.sqrt(b.size) + 1.0, spread


def near_edge(groups: Sequence[Sequence[float | None]], band: float) -> int:
    """Stored singular values within `band` of the edge (those a small change can move
    across it), over all groups."""
    return sum(1 for g in groups for v in g if v is not None and abs(v - 1.0) <= band)


def null_margins(variances: Sequence[float], level: float) -> np.ndarray:
    """Per test, the smallest k with P(|Δ| > k) ≤ `level` for Δ the difference of two
    Poisson counts of mean variance/2 each (Skellam 1946): crossings up minus crossings
    down. A count moves by whole outliers, so a normal quantile would call a single
    crossing significant."""
    mu = np.asarray(variances, dtype=np.float64) / 2.0
    out = np.zeros_like(mu)
    unique = np.unique(mu[mu > 0])
    if unique.size:
        # P(Δ = j) = e^(−2μ)·I_j(2μ) (`ive`); P(|Δ| > k) = 2·Σ_{j>k} P(Δ = j), summed from the
        # far end of a grid wide enough for every μ; the margin is the first k within level
        j = np.arange(int(np.ceil(2 * unique.max() + 12 * np.sqrt(unique.max()) + 40)))
        pmf = ive(j[None, :], 2.0 * unique[:, None])
        beyond = np.cumsum(pmf[:, ::-1], axis=1)[:, ::-1] - pmf    # Σ_{i>j} P(Δ = i)
        first = np.argmax(2.0 * beyond <= level, axis=1)
        margins = dict(zip(unique.tolist(), j[first].astype(np.float64).tolist(), strict=True))
        out[mu > 0] = [margins[v] for v in mu[mu > 0].tolist()]
    return out


def null_inputs(modules: Sequence[Mapping[str, Any]],
                band: float) -> tuple[np.ndarray, np.ndarray]:
    """Per module of one run: (excess Δ_m, values near the edge N_m) — what `null_scale`
    calibrates τ from (committed per benign run, so the shipped τ can be recomputed)."""
    moved = np.array([excess(m) for m in modules], dtype=np.float64)
    near = np.array([near_edge([*m["baseline"], *m["subject"]], band) for m in modules],
                    dtype=np.float64)
    return moved, near


def null_scale(moved: Sequence[float], near: Sequence[float],
               confidence: float = NULL_CONFIDENCE) -> float:
    """τ of one benign run, as an upper confidence bound: u_m = Δ_m / √(N_m + 1) has
    variance τ² under the model, so Σ u² / χ²_{1−c}(M) bounds τ² from above with confidence
    c (a run of 16 modules estimates τ loosely; one of 200 tightly). The shipped τ is the
    largest over the benign runs (the worst benign edit sets it)."""
    d = np.asarray(moved, dtype=np.float64)
    if d.size == 0:
        return 0.0
    u2 = float(np.sum(d * d / (np.asarray(near, dtype=np.float64) + 1.0)))
    return math.sqrt(u2 / float(chdtri(d.size, confidence)))  # χ² quantile at 1 − c


def covering_scale(moved: Sequence[float], near: Sequence[float], level: float) -> float:
    """The smallest τ under which every module of one benign run is within its margin at
    `level` (|Δ_m| ≤ Q(τ²·(N_m + 1))). The variance model is one τ for every module, and a
    benign edit can move one module far more than the rest (SmolLM2's massive-activation
    down-projection under magnitude pruning: 7.6 times the run's root mean square), which
    the mean-square bound of `null_scale` averages away."""
    d = np.abs(np.asarray(moved, dtype=np.float64))
    n = np.asarray(near, dtype=np.float64)

    def covers(tau: float) -> bool:
        return bool(np.all(d <= null_margins(tau * tau * (n + 1.0), level)))

    if d.size == 0 or covers(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while not covers(high):  # Q grows without bound with the variance
        low, high = high, 2.0 * high
    for _ in range(40):  # to 2⁻⁴⁰ of the bracket: far below the 0.01 the shipped τ rounds to
        middle = 0.5 * (low + high)
        low, high = (low, middle) if covers(middle) else (middle, high)
    return high


def excess(m: Mapping[str, Any]) -> float:
    """Outliers added (lost, < 0) by the subject, summed over the window groups."""
    return float(counts(m["subject"]).sum() - counts(m["baseline"]).sum())


def _finite(groups: Sequence[Sequence[float | None]]) -> bool:
    return all(v is not None for g in groups for v in g)


def decide(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> GuardDecision:
    """Stable iff no module and no family moved its outlier count beyond its null margin."""
    skipped = unmeasured_decision(measurements)
    if skipped is not None:
        return skipped
    modules = list(measurements["modules"])
    if not modules:
        return GuardDecision(False, "not measured: no module matched")
    if policy.get("null_tau") is None:  # a policy written before the calibrated null
        return GuardDecision(False, "not decided: the policy has no rmt.null_tau (the null "
                                    "margin's calibrated scale)")
    eps = {f: float(v) for f, v in policy["epsilon_by_family"].items()}
    tau = float(policy["null_tau"])
    band = float(policy.get("edge_band", DEFAULT_EDGE_BAND))
    alpha = float(policy.get("false_alarm_rate", DEFAULT_FALSE_ALARM_RATE))
    families = [f for f in FAMILIES if any(m["family"] == f for m in modules)]
    tests = len(modules) + len(families)
    level = alpha / tests  # Bonferroni: each test at α/T, two-sided
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"false_alarm_rate must lie in (0, 1), got {alpha}")
    findings: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"families": {}, "null_tau": tau, "edge_band": band,
                               "false_alarm_rate": alpha, "tests": tests, "level": level}
    unstable = []
    closest: tuple[float, str, float, float] = (-1.0, "", 0.0, 0.0)
    for fam in families:
        members = [m for m in modules if m["family"] == fam]
        near = [near_edge([*m["baseline"], *m["subject"]], band) for m in members]
        moved = [excess(m) for m in members]
        limits = null_margins([tau * tau * (n + 1) for n in near], level)
        rows = []
        for m, n, d, limit in zip(members, near, moved, limits, strict=True):
            broken = not _finite(m["subject"]) and _finite(m["baseline"])
            rows.append((m, d, n, float(limit), broken or abs(d) > limit))
            share = float(abs(d) / limit) if limit > 0 else (math.inf if d else 0.0)
            if share > closest[0]:
                closest = (share, m["name"], d, float(limit))
        base = np.sum([counts(m["baseline"]) for m in members], axis=0)
        subj = np.sum([counts(m["subject"]) for m in members], axis=0)
        fam_excess = float(subj.sum() - base.sum())
        spread = tau * math.sqrt(sum(r[2] + 1 for r in rows))
        fam_limit = float(null_margins([spread * spread], level)[0]) + eps[fam] * float(
            base.sum())
        flagged = [r for r in rows if r[4]]
        worst = max(rows, key=lambda r: abs(r[1]) / r[3] if r[3] > 0 else abs(r[1]))
        ok = abs(fam_excess) <= fam_limit and not flagged
        summary["families"][fam] = {
            "modules": len(members), "epsilon": eps[fam], "stable": ok,
            "baseline_outliers": int(base.sum()), "subject_outliers": int(subj.sum()),
            "excess": fam_excess, "margin": fam_limit, "null_spread": spread,
            "baseline_by_group": [int(v) for v in base],
            "subject_by_group": [int(v) for v in subj],
            "modules_beyond_margin": len(flagged), "module": worst[0]["name"],
            "module_excess": worst[1], "module_margin": worst[3],
        }
        if ok:
            continue
        unstable.append((fam, fam_excess, fam_limit, len(flagged)))
        for m, d, near, limit, _ in flagged:
            b, s_ = int(counts(m["baseline"]).sum()), int(counts(m["subject"]).sum())
            findings.append({
                "module": m["name"], "family": fam, "kind": "violation",
                "message": (f"{s_} outliers beyond the Marchenko–Pastur edge vs {b} in the "
                            f"baseline ({d:+.0f}, beyond the null margin ±{limit:.1f} from "
                            f"{near} values near the edge)"),
                "baseline_outliers": b, "subject_outliers": s_, "margin": limit,
                "near_edge": near,
            })
    summary["closest_module"] = {"module": closest[1], "excess": closest[2],
                                 "margin": closest[3],  # JSON has no inf: a zero margin moved
                                 "share": closest[0] if math.isfinite(closest[0]) else None}
    windows = measurements.get("windows", "?")
    if unstable:
        parts = ", ".join(
            f"{f} {e:+.0f} outliers (margin ±{lim:.1f}" + (
                f", {n} module(s) beyond their own margin)" if n else ")")
            for f, e, lim, n in unstable)
        return GuardDecision(False, f"activation outliers beyond the Marchenko–Pastur edge "
                                    f"moved beyond the null margin in {parts}",
                             tuple(findings), summary)
    return GuardDecision(True, f"{len(modules)} modules on {windows} windows; outlier counts "
                               f"within the null margin (per-run false-alarm rate {alpha:g} "
                               f"over {tests} tests); closest: {closest[1]} "
                               f"{closest[2]:+.0f} of ±{closest[3]:.1f}",
                         (), summary)


RMT = BuiltinGuard(
    NAME, FLAG, (Stage.ACTIVATIONS,),
    measures=("singular values beyond the Marchenko–Pastur edge of standardised linear "
              "outputs on the first K final windows, per window group, baseline pass vs "
              "subject pass (taps)"),
    decide_fn=decide, probe_path="invarlock.guards.measure.rmt:RMTProbe")
