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

Null spread: the K calibration windows are split into G groups; every module's outliers are
counted per group. Per family, the baseline's counts vary from group to group — the
window-to-window variation of the statistic, measured on the baseline itself. With
B_g and S_g the family's outlier counts of group g (baseline, subject):

    excess  Δ_f = Σ_g (S_g − B_g)                      outliers added (or, < 0, lost)
    spread  s_f = sd_g(B_g)                              the baseline's null spread
    margin  M_f = ε_f · Σ_g B_g + z · s_f · √G + 1       (z = `null_z`)

Family f is stable iff |Δ_f| ≤ M_f: new outlier directions (blown-up weight rows) add to the
count; a layer whose output lost its structure (a blown-up block upstream drowning it)
loses outliers, which is damage too. Because a family sum can dilute a change confined to
one module, each module is also held to the same rule with its own counts and spread; a
module beyond its own margin makes its family unstable. The guard passes iff every family
is stable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from invarlock.guards.base import BuiltinGuard, GuardDecision, Stage, unmeasured_decision

NAME = "rmt"
FLAG = "rmt_stable"
FAMILIES = ("attn", "ffn", "embed", "other")
# Normalised singular values kept per module and group: those above this fraction of the
# edge (the decision counts those above 1), at most `KEEP_VALUES` of them.
KEEP_ABOVE = 0.8
KEEP_VALUES = 48
DEFAULT_NULL_Z = 3.0


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
    top = [float(v) for v in values[:KEEP_VALUES] if not np.isfinite(v) or v > KEEP_ABOVE]
    return [round(v, 5) if np.isfinite(v) else None for v in top]


def outliers(values: Sequence[float | None]) -> int:
    """Singular values beyond the Marchenko–Pastur edge (a non-finite one counts)."""
    return sum(1 for v in values if v is None or v > 1.0)


def counts(groups: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([outliers(g) for g in groups], dtype=np.float64)


def margin(base_counts: np.ndarray, epsilon: float, null_z: float) -> tuple[float, float]:
    """(margin on the excess, null spread) from the baseline's per-group counts."""
    b = np.asarray(base_counts, dtype=np.float64)
    spread = float(np.std(b, ddof=1)) if b.size > 1 else 0.0
    return epsilon * float(b.sum()) + null_z * spread * math.sqrt(b.size) + 1.0, spread


def _module_counts(m: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return counts(m["baseline"]), counts(m["subject"])


def decide(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> GuardDecision:
    """Stable iff no family and no module moved its outlier count beyond its null margin."""
    skipped = unmeasured_decision(measurements)
    if skipped is not None:
        return skipped
    modules = list(measurements["modules"])
    if not modules:
        return GuardDecision(False, "not measured: no module matched")
    eps = {f: float(v) for f, v in policy["epsilon_by_family"].items()}
    null_z = float(policy.get("null_z", DEFAULT_NULL_Z))
    findings: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"families": {}, "null_z": null_z}
    unstable = []
    for fam in [f for f in FAMILIES if any(m["family"] == f for m in modules)]:
        members = [m for m in modules if m["family"] == fam]
        per_module = [_module_counts(m) for m in members]
        base = np.sum([b for b, _ in per_module], axis=0)
        subj = np.sum([s for _, s in per_module], axis=0)
        excess = float(subj.sum() - base.sum())
        limit, spread = margin(base, eps[fam], null_z)
        flagged = []
        for m, (b, s) in zip(members, per_module, strict=True):
            m_excess = float(s.sum() - b.sum())
            m_limit, _m_spread = margin(b, eps[fam], null_z)
            if abs(m_excess) > m_limit:
                flagged.append((m, m_excess, m_limit, b, s))
        worst = max(zip(members, per_module, strict=True),
                    key=lambda t: abs(float(t[1][1].sum() - t[1][0].sum())))
        ok = abs(excess) <= limit and not flagged
        summary["families"][fam] = {
            "modules": len(members), "epsilon": eps[fam], "stable": ok,
            "baseline_outliers": int(base.sum()), "subject_outliers": int(subj.sum()),
            "excess": excess, "margin": limit, "null_spread": spread,
            "baseline_by_group": [int(v) for v in base],
            "subject_by_group": [int(v) for v in subj],
            "modules_beyond_margin": len(flagged), "module": worst[0]["name"],
        }
        if ok:
            continue
        unstable.append((fam, excess, limit, len(flagged)))
        for m, m_excess, m_limit, b, s in flagged:
            findings.append({
                "module": m["name"], "family": fam, "kind": "violation",
                "message": (f"{int(s.sum())} outliers beyond the Marchenko–Pastur edge vs "
                            f"{int(b.sum())} in the baseline ({m_excess:+.0f}, beyond the "
                            f"margin ±{m_limit:.1f})"),
                "baseline_outliers": int(b.sum()), "subject_outliers": int(s.sum()),
                "margin": m_limit,
            })
    windows = measurements.get("windows", "?")
    if unstable:
        parts = ", ".join(
            f"{f} {e:+.0f} outliers (margin ±{lim:.1f}" + (
                f", {n} module(s) beyond their own margin)" if n else ")")
            for f, e, lim, n in unstable)
        return GuardDecision(False, f"activation outliers beyond the Marchenko–Pastur edge "
                                    f"moved beyond the null margin in {parts}",
                             tuple(findings), summary)
    fams = summary["families"]
    top = max(fams, key=lambda f: abs(fams[f]["excess"]) - fams[f]["margin"])
    return GuardDecision(True, f"{len(modules)} modules on {windows} windows; outlier counts "
                               f"within the null margin in every family (closest: {top} "
                               f"{fams[top]['excess']:+.0f} of ±{fams[top]['margin']:.1f})",
                         (), summary)


RMT = BuiltinGuard(
    NAME, FLAG, (Stage.ACTIVATIONS,),
    measures=("singular values beyond the Marchenko–Pastur edge of standardised linear "
              "outputs on the first K final windows, per window group, baseline pass vs "
              "subject pass (taps)"),
    decide_fn=decide, probe_path="invarlock.guards.measure.rmt:RMTProbe")
