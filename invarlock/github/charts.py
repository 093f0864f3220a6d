"""The Mermaid charts in the PR comment, the check run and the job summary: the gated
interval against the limit, the per-window deltas, the sequential test's bounds at each look.

Pure: a certificate (already escaped for display) in, Markdown out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from invarlock.certificate import sequential_view

_MAX_BINS = 12


def confidence_level(cert: dict[str, Any] | None) -> str:
    """The interval's confidence level from the certificate's recorded α ("95%" for 0.05)."""
    pm = (cert or {}).get("primary_metric") or {}
    boot = pm.get("bootstrap") if isinstance(pm, dict) else None
    alpha = boot.get("alpha") if isinstance(boot, dict) else None
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1:
        return "level unrecorded"
    return f"{100 * (1 - float(alpha)):g}%"


def bounds_chart(cert: dict[str, Any]) -> str:
    """The confidence sequence's bounds at each look against the threshold, as a Mermaid
    line chart; empty with fewer than two looks (nothing narrows)."""
    seq = sequential_view.view(cert)
    if seq is None or len(seq.looks) < 2:
        return ""
    lows = [lk.low for lk in seq.looks]
    highs = [lk.high for lk in seq.looks]
    values = [*lows, *highs, seq.threshold]
    pad = (max(values) - min(values)) * 0.1 or 1e-3
    unit = "pp, negated" if seq.accuracy else "nats/token"
    labels = [_quoted(str(lk.windows)) for lk in seq.looks]

    def series(xs: list[float]) -> str:
        return ", ".join(f"{x:.6f}" for x in xs)

    return "\n".join([
        "```mermaid",
        "xychart-beta",
        f'    title "Sequential test: bounds at each look against the threshold ({unit})"',
        f'    x-axis "windows evaluated" [{", ".join(labels)}]',
        f'    y-axis "mean Δ bounds" {min(values) - pad:.6f} --> {max(values) + pad:.6f}',
        f"    line [{series(highs)}]",
        f"    line [{series(lows)}]",
        f"    line [{series([seq.threshold] * len(seq.looks))}]",
        "```",
        "",
        f"Lines: the upper bound, the lower bound and the threshold ({seq.threshold:+.6f}) at "
        f"each of the {len(seq.looks)} looks.",
    ])


def gate_chart(cert: dict[str, Any]) -> str:
    """The gated interval as a Mermaid chart: point and CI bounds as bars, the limit a line.

    Empty when there is no interval (a catastrophic preview stops before the final set).
    """
    pm = cert["primary_metric"]
    if pm["gate_value"] is None:
        return ""
    if pm["basis"] == "ratio_ci_upper":
        lo, hi = pm["ratio_ci"]
        point, what, digits = pm["ratio"], "Perplexity ratio subject / baseline", 4
        bars = ["CI lower", "ratio", "CI upper (gated)"]
    else:
        lo, hi = pm["delta"]["ci"]
        point, what, digits = pm["delta"]["estimate"], "Accuracy change (pp)", 2
        bars = ["CI lower (gated)", "change", "CI upper"]
    limit = float(pm["limit"])
    values = [float(lo), float(point), float(hi)]
    low, high = min(*values, limit), max(*values, limit)
    pad = max((high - low) * 0.25, 10.0 ** -digits * 5)
    bottom = low - pad if pm["basis"] != "ratio_ci_upper" else max(0.0, low - pad)
    shown = ", ".join(f"{v:.{digits}f}" for v in values)
    return "\n".join([
        "#### Gate: the interval against the limit",
        "",
        "```mermaid",
        "xychart-beta",
        f'    title "{what}: {confidence_level(cert)} CI against the limit {limit:.{digits}f}"',
        f'    x-axis [{", ".join(_quoted(b) for b in bars)}]',
        f'    y-axis "{what}" {bottom:.{digits}f} --> {high + pad:.{digits}f}',
        f"    bar [{shown}]",
        f"    line [{', '.join(f'{limit:.{digits}f}' for _ in values)}]",
        "```",
        "",
        f"Bars: the CI lower bound, the point estimate and the CI upper bound ({shown}); "
        f"line: the limit ({limit:.{digits}f}).",
    ])


def delta_chart(cert: dict[str, Any]) -> str:
    """A Mermaid histogram of per-window Δ (subject − baseline), with one line of context."""
    deltas = window_deltas(cert)
    if deltas.values.size == 0:
        return f"No per-window results to chart ({deltas.nonfinite} non-finite)."
    accuracy = cert["primary_metric"]["kind"] == "accuracy"
    if accuracy:
        labels = ["−1 (newly wrong)", "0 (unchanged)", "+1 (newly right)"]
        counts = [int(np.sum(deltas.values == v)) for v in (-1.0, 0.0, 1.0)]
        axis, unit = "Δ correct per example", "examples"
    else:
        labels, counts = _histogram(deltas.values)
        axis, unit = "Δ log-loss (nats/token)", "windows"
    top = max(counts)
    chart = "\n".join([
        "```mermaid",
        "xychart-beta",
        f'    title "Subject − baseline, {deltas.set_name} set ({deltas.values.size} {unit})"',
        f'    x-axis "{axis}" [{", ".join(_quoted(label) for label in labels)}]',
        f'    y-axis "{unit}" 0 --> {max(top, 1)}',
        f"    bar [{', '.join(str(c) for c in counts)}]",
        "```",
    ])
    return chart + "\n\n" + _delta_caption(cert, deltas, accuracy)


# ----------------------------------------------------------------------------- deltas


@dataclass(frozen=True)
class WindowDeltas:
    set_name: str  # "final", or "preview" when the final set was not evaluated
    values: np.ndarray  # float64 [N] finite per-window Δ
    nonfinite: int  # windows whose subject loss was not finite


def window_deltas(cert: dict[str, Any]) -> WindowDeltas:
    """Per-window Δ: subject − baseline per-token log-loss (or correctness for classifiers)."""
    windows = cert["windows"]
    name = "final" if windows["final"]["subject"] else "preview"
    w = windows[name]
    base = np.asarray(w["baseline"], dtype=np.float64)
    subj = np.asarray([np.nan if v is None else v for v in w["subject"]], dtype=np.float64)
    tokens = np.asarray(w["tokens"], dtype=np.float64)
    seq = sequential_view.view(cert)
    if name == "final" and seq is not None and subj.size == seq.evaluated < base.size:
        base, tokens = base[:subj.size], tokens[:subj.size]  # the windows evaluated
    if subj.size != base.size:
        return WindowDeltas(name, np.zeros(0), 0)
    if cert["primary_metric"]["kind"] != "accuracy":
        delta = subj / tokens - base / tokens
    else:
        delta = subj - base
    finite = np.isfinite(delta)
    return WindowDeltas(name, delta[finite], int(np.count_nonzero(~finite)))


def _histogram(values: np.ndarray) -> tuple[list[str], list[int]]:
    bins = max(1, min(_MAX_BINS, math.ceil(math.sqrt(values.size))))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        return [_signed(lo, 4)], [int(values.size)]
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    width = edges[1] - edges[0]
    decimals = max(1, min(6, 1 - math.floor(math.log10(width))))
    centres = (edges[:-1] + edges[1:]) / 2
    return [_signed(c, decimals) for c in centres], [int(c) for c in counts]


def _delta_caption(cert: dict[str, Any], deltas: WindowDeltas, accuracy: bool) -> str:
    pm = cert["primary_metric"]
    values = deltas.values
    seq = sequential_view.view(cert)
    early = seq is not None and seq.early and deltas.set_name == "final"
    if accuracy:
        worse = int(np.sum(values < 0))
        better = int(np.sum(values > 0))
        text = f"{worse} examples newly wrong, {better} newly right"
    else:
        p5, median, p95 = np.percentile(values, [5, 50, 95])
        text = (f"Median Δ {_signed(median, 4)} nats/token; 90% of windows between "
                f"{_signed(p5, 4)} and {_signed(p95, 4)}")
        delta = pm["delta"]
        if not early and delta is not None and pm["limit"] > 0:
            text += (f". The gate compares the mean's upper bound ({_signed(delta['ci'][1], 4)}) "
                     f"with ln {pm['limit']:.2f} = {_signed(math.log(pm['limit']), 4)}")
    if early:
        assert seq is not None
        text += (f". Only the first {seq.evaluated} of {seq.maximum} final windows were "
                 "evaluated: the sequential test decided there, on its own bounds")
    if deltas.nonfinite:
        text += f"; {deltas.nonfinite} windows with non-finite subject loss"
    return text + "."


def _signed(x: float, decimals: int) -> str:
    text = f"{x:+.{decimals}f}"
    return text.replace("-", "−")


def _quoted(label: str) -> str:
    return '"' + label.replace('"', "'") + '"'
