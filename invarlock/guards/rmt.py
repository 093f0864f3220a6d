"""RMT guard: did the subject's activations grow outliers the baseline did not have?

For a module's output on the calibration windows, Y (m sampled token rows × n features) is
standardised and compared with the Marchenko–Pastur edge (Marchenko & Pastur 1967): a
matrix of i.i.d. unit-variance entries has σ_max ≈ √m + √n, so the edge risk

    e = σ_max(Ỹ) / (√m + √n)

is about 1 for structureless activations and grows with low-rank structure (outlier
features, a dominant direction).

Standardisation: Ỹ = (Y − column means) / s with ONE global scale s, the median over
features of their standard deviations. Centring removes constant offsets (biases) that would
otherwise be a rank-one spike in every model. A single scale keeps each feature's relative
energy: when a few rows of a weight are blown up, the features they produce dominate σ_max.
Scaling each column to unit variance (a correlation matrix) would shrink exactly those
outlier features back to the bulk and hide the damage; a scale from the total energy (RMS)
would let the outliers inflate the yardstick and dilute themselves — especially when the
baseline already has a dominant direction. The median feature scale is set by the bulk,
which a handful of outliers cannot move, and for i.i.d. entries it equals the common standard
deviation, so e ≈ 1 keeps its Marchenko–Pastur meaning.

Each module is compared with itself first, g = e(subject)/e(baseline); per family the
statistic is the maximum of g over its modules, and the family is stable iff
max g ≤ 1 + ε_f; the guard passes iff every family is stable. (Taking the maximum edge risk
of each model per family and comparing those would let a module whose baseline edge risk is
naturally high mask the growth of any other module in the family — on the demo model, FFN
outlier rows that raise one projection's edge risk by 30% left the family maximum unmoved.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from invarlock.guards.base import BuiltinGuard, GuardDecision, Stage, unmeasured_decision

NAME = "rmt"
FLAG = "rmt_stable"
FAMILIES = ("attn", "ffn", "embed", "other")


def edge_risk(y: np.ndarray) -> float:
    """σ_max of the centred rows of `y` over (median feature scale · (√m + √n))."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 2 or min(y.shape) < 2:
        raise ValueError(f"edge risk needs a 2-D matrix with at least 2 rows and columns, "
                         f"got shape {y.shape}")
    m, n = y.shape
    yc = y - y.mean(axis=0, dtype=np.float64).astype(np.float32)
    gram = yc @ yc.T if m <= n else yc.T @ yc
    return edge_risk_from_gram(gram, np.square(yc, dtype=np.float64).mean(axis=0), m, n)


def edge_risk_from_gram(gram: np.ndarray, column_variances: np.ndarray, m: int,
                        n: int) -> float:
    """The edge risk from the Gram matrix of the centred rows (m×m or n×n) and the feature
    variances; σ_max² is the Gram's largest eigenvalue. A constant matrix has edge risk 0;
    when most features are constant the RMS scale is used instead of the median."""
    col_var = np.asarray(column_variances, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    if col_var.shape != (n,) or gram.shape not in ((m, m), (n, n)) or min(m, n) < 2:
        raise ValueError(f"inconsistent shapes: gram {gram.shape}, variances {col_var.shape}, "
                         f"m={m}, n={n}")
    if not (np.all(np.isfinite(col_var)) and np.all(np.isfinite(gram))):
        return float("inf")
    scale = float(np.sqrt(np.median(col_var)))
    if scale == 0.0:
        scale = float(np.sqrt(col_var.mean()))
        if scale == 0.0:
            return 0.0
    sigma = np.sqrt(max(largest_eigenvalue(gram), 0.0))
    return float(sigma / scale / (np.sqrt(m) + np.sqrt(n)))


def largest_eigenvalue(gram: np.ndarray) -> float:
    """λ_max of a symmetric PSD matrix: Lanczos (ARPACK) from a fixed start, exact for tiny ones.

    Lanczos needs only matrix-vector products, which keeps it fast where a full
    eigendecomposition would be dominated by LAPACK overhead; the fixed start vector and
    tolerance 0 (machine precision) make it deterministic.
    """
    k = gram.shape[0]
    if k <= 16:
        return float(np.linalg.eigvalsh(gram)[-1])
    from scipy.sparse.linalg import eigsh

    start = np.full(k, 1.0 / np.sqrt(k))
    return float(eigsh(gram, k=1, which="LA", v0=start, return_eigenvectors=False, tol=0)[0])


def growth(baseline: float | None, subject: float | None) -> float:
    """e(subject)/e(baseline); 1 when both are 0, inf when only the baseline is, and inf
    when either is None (activations that were not finite)."""
    if baseline is None or subject is None:
        return float("inf")
    if baseline > 0:
        return subject / baseline
    return 1.0 if subject == 0 else float("inf")


def _value(x: Any) -> float | None:
    return None if x is None else float(x)


def family_growth(modules: list[Mapping[str, Any]]) -> dict[str, tuple[float, str]]:
    """Per family: (largest module growth e_s/e_b, the module that has it)."""
    out: dict[str, tuple[float, str]] = {}
    for m in modules:
        g = growth(_value(m["baseline"]), _value(m["subject"]))
        fam = m["family"]
        if fam not in out or g > out[fam][0]:
            out[fam] = (g, m["name"])
    return out


def decide(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> GuardDecision:
    """Stable iff e(subject)/e(baseline) <= 1 + ε_f for every module of every family."""
    skipped = unmeasured_decision(measurements)
    if skipped is not None:
        return skipped
    modules = list(measurements["modules"])
    if not modules:
        return GuardDecision(True, "no module in scope was observed")
    eps = {f: float(v) for f, v in policy["epsilon_by_family"].items()}
    grown = family_growth(modules)
    findings: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"families": {}}
    unstable = []
    for fam in sorted(grown):
        ratio, name = grown[fam]
        limit = 1.0 + eps[fam]
        ok = ratio <= limit
        members = [m for m in modules if m["family"] == fam]
        summary["families"][fam] = {
            "modules": len(members), "max_growth": _finite(ratio), "module": name,
            "epsilon": eps[fam], "stable": ok,
            "baseline_max": _max(m["baseline"] for m in members),
            "subject_max": _max(m["subject"] for m in members),
        }
        if ok:
            continue
        unstable.append((fam, ratio))
        for m in members:
            g = growth(_value(m["baseline"]), _value(m["subject"]))
            if g > limit:
                shown = ("not finite" if m["subject"] is None or m["baseline"] is None else
                         f"{float(m['subject']):.3f} vs baseline {float(m['baseline']):.3f}")
                findings.append({
                    "module": m["name"], "family": fam, "kind": "violation",
                    "message": f"edge risk {shown} (×{g:.3f} > 1 + ε = {limit:.3f})",
                    "edge_risk_baseline": _value(m["baseline"]),
                    "edge_risk_subject": _value(m["subject"]), "growth": _finite(g),
                })
    if unstable:
        parts = ", ".join(f"{f} ×{r:.3f} > {1 + eps[f]:.3f}" for f, r in unstable)
        return GuardDecision(False, f"activation edge risk grew beyond ε in {parts}",
                             tuple(findings), summary)
    fam, (ratio, name) = max(grown.items(), key=lambda kv: kv[1][0])
    return GuardDecision(True, f"{len(modules)} modules on {measurements.get('windows', '?')} "
                               f"windows; every family within ε (largest growth ×{ratio:.4f} "
                               f"in {fam}, {name})", (), summary)


def _max(values: Any) -> float | None:
    finite = [float(v) for v in values if v is not None]
    return max(finite) if finite else None


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


RMT = BuiltinGuard(
    NAME, FLAG, (Stage.ACTIVATIONS,),
    measures=("edge risk σ_max/(√m+√n) of standardised linear outputs on the first K final "
              "windows, baseline pass vs subject pass (taps)"),
    decide_fn=decide, probe_path="invarlock.guards.measure.rmt:RMTProbe")
