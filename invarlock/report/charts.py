"""Inline SVG charts for the HTML report: an interval plot, histograms, a bar chart.

Pure functions from numbers to SVG text (no I/O, no scripts, no external resources), so the
report stays one self-contained file that renders the same everywhere, printed included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

PASS_COLOUR = "#1a7f37"
FAIL_COLOUR = "#cf222e"
INK = "#1f2328"
MUTED = "#656d76"
GRID = "#d0d7de"
FAMILY_COLOURS = {"attn": "#0969da", "ffn": "#8250df", "embed": "#bf8700", "other": "#57606a"}


@dataclass(frozen=True)
class Scale:
    """Linear map from data values [lo, hi] to pixels [left, right]."""

    lo: float
    hi: float
    left: float
    right: float

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo or 1.0
        return self.left + (value - self.lo) / span * (self.right - self.left)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100 or abs(value) < 0.001:
        return f"{value:.3g}"
    return f"{value:.4g}"


def _text(x: float, y: float, content: str, *, anchor: str = "middle", size: int = 12,
          colour: str = INK, weight: str = "normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
            f'fill="{colour}" font-weight="{weight}">{escape(content)}</text>')


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="100%" role="img" aria-label="{escape(label)}" '
            f'font-family="system-ui, -apple-system, Segoe UI, sans-serif">'
            f"<title>{escape(label)}</title>{''.join(body)}</svg>")


def interval_plot(*, estimate: float, low: float, high: float, limit: float,
                  reference: float, upper_limit: bool, passed: bool, label: str,
                  unit: str = "", value_format: str = ".4f") -> str:
    """The estimate and its CI on an axis with the acceptance limit and the no-change line.

    `upper_limit`: the limit bounds the CI from above (perplexity ratio); otherwise from
    below (accuracy change). The side of the limit that fails is shaded.
    """
    width, height = 720, 150
    values = [estimate, low, high, limit, reference]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.25 or abs(hi) * 0.05 or 1.0
    scale = Scale(lo - pad, hi + pad, 40, width - 40)
    axis_y, bar_y = 105, 62
    body = [f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    x_limit = scale(limit)
    if upper_limit:
        body.append(f'<rect x="{x_limit:.1f}" y="20" width="{width - 40 - x_limit:.1f}" '
                    f'height="{axis_y - 20}" fill="{FAIL_COLOUR}" fill-opacity="0.08"/>')
    else:
        body.append(f'<rect x="40" y="20" width="{x_limit - 40:.1f}" height="{axis_y - 20}" '
                    f'fill="{FAIL_COLOUR}" fill-opacity="0.08"/>')
    body.append(f'<line x1="40" y1="{axis_y}" x2="{width - 40}" y2="{axis_y}" '
                f'stroke="{MUTED}" stroke-width="1"/>')
    for tick in nice_ticks(scale.lo, scale.hi, 6):
        x = scale(tick)
        body.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" '
                    f'stroke="{MUTED}"/>')
        body.append(_text(x, axis_y + 19, _fmt(tick) + unit, size=11, colour=MUTED))
    x_ref = scale(reference)
    body.append(f'<line x1="{x_ref:.1f}" y1="24" x2="{x_ref:.1f}" y2="{axis_y}" '
                f'stroke="{MUTED}" stroke-dasharray="2 3"/>')
    body.append(_text(x_ref, 18, "no change", size=11, colour=MUTED))
    body.append(f'<line x1="{x_limit:.1f}" y1="24" x2="{x_limit:.1f}" y2="{axis_y}" '
                f'stroke="{FAIL_COLOUR}" stroke-width="2" stroke-dasharray="6 4"/>')
    body.append(_text(x_limit + (4 if upper_limit else -4), 36,
                      f"limit {limit:{'+.2f' if value_format.startswith('+') else '.2f'}}{unit}",
                      size=11,
                      colour=FAIL_COLOUR, anchor="start" if upper_limit else "end"))
    colour = PASS_COLOUR if passed else FAIL_COLOUR
    x_lo, x_hi, x_est = scale(low), scale(high), scale(estimate)
    body.append(f'<line x1="{x_lo:.1f}" y1="{bar_y}" x2="{x_hi:.1f}" y2="{bar_y}" '
                f'stroke="{colour}" stroke-width="8" stroke-linecap="round" opacity="0.55"/>')
    for x in (x_lo, x_hi):
        body.append(f'<line x1="{x:.1f}" y1="{bar_y - 10}" x2="{x:.1f}" y2="{bar_y + 10}" '
                    f'stroke="{colour}" stroke-width="2"/>')
    body.append(f'<circle cx="{x_est:.1f}" cy="{bar_y}" r="6" fill="{colour}" '
                f'stroke="#ffffff" stroke-width="2"/>')
    if x_hi - x_lo >= 60:
        body.append(_text(x_lo - 2, bar_y + 26, f"{low:{value_format}}{unit}", size=11,
                          colour=colour, anchor="end"))
        body.append(_text(x_hi + 2, bar_y + 26, f"{high:{value_format}}{unit}", size=11,
                          colour=colour, anchor="start"))
    else:  # too narrow for two labels: one, centred
        body.append(_text((x_lo + x_hi) / 2, bar_y + 26, f"CI {low:{value_format}} to "
                          f"{high:{value_format}}{unit}", size=11, colour=colour))
    body.append(_text(x_est, bar_y - 14, f"{estimate:{value_format}}{unit}", size=12,
                      colour=colour, weight="bold"))
    return _svg(width, height, body, label)


def histogram(values: Sequence[float], *, label: str, x_label: str, bins: int = 24,
              marks: Sequence[tuple[float, str]] = ()) -> str:
    """Counts of `values` in equal-width bins, with labelled vertical marks (e.g. the mean)."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    width, height = 720, 220
    left, right, top, bottom = 50, width - 20, 20, height - 45
    if data.size == 0:
        return _svg(width, 60, [_text(width / 2, 35, "no finite values", colour=MUTED)], label)
    lo, hi = float(data.min()), float(data.max())
    for value, _ in marks:
        lo, hi = min(lo, value), max(hi, value)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(data, bins=bins, range=(lo, hi))
    scale = Scale(lo, hi, left, right)
    peak = int(counts.max()) or 1
    body = [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{MUTED}"/>']
    for tick in nice_ticks(0, peak, 4):
        y = bottom - tick / peak * (bottom - top)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" '
                    f'stroke="{GRID}" stroke-width="0.5"/>')
        body.append(_text(left - 6, y + 4, f"{tick:g}", anchor="end", size=11, colour=MUTED))
    for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if count == 0:
            continue
        x0, x1 = scale(a), scale(b)
        h = count / peak * (bottom - top)
        body.append(f'<rect x="{x0 + 0.5:.1f}" y="{bottom - h:.1f}" '
                    f'width="{max(x1 - x0 - 1, 1):.1f}" height="{h:.1f}" fill="#0969da" '
                    f'fill-opacity="0.7">'
                    f"<title>{_fmt(a)} to {_fmt(b)}: {count}</title></rect>")
    for tick in nice_ticks(lo, hi, 6):
        x = scale(tick)
        body.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" '
                    f'stroke="{MUTED}"/>')
        body.append(_text(x, bottom + 17, _fmt(tick), size=11, colour=MUTED))
    for value, name in marks:
        x = scale(value)
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                    f'stroke="{INK}" stroke-dasharray="4 3"/>')
        body.append(_text(x + 4, top + 10, name, anchor="start", size=11))
    body.append(_text((left + right) / 2, height - 8, x_label, size=12, colour=MUTED))
    return _svg(width, height, body, label)


def log_histogram(edges: Sequence[float], counts: Sequence[int], *, label: str, x_label: str,
                  marks: Sequence[tuple[float, str]] = ()) -> str:
    """Counts already binned on log10 edges (e.g. per-token KL divergence), drawn on a log
    axis with ticks at powers of ten; marks are values (not logs), drawn when positive."""
    width, height = 720, 220
    left, right, top, bottom = 50, width - 20, 20, height - 45
    if len(edges) != len(counts) + 1 or not any(counts):
        return _svg(width, 60, [_text(width / 2, 35, "no values in range", colour=MUTED)],
                    label)
    lo, hi = float(edges[0]), float(edges[-1])
    scale = Scale(lo, hi, left, right)
    peak = max(int(c) for c in counts) or 1
    body = [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{MUTED}"/>']
    for tick in nice_ticks(0, peak, 4):
        y = bottom - tick / peak * (bottom - top)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" '
                    f'stroke="{GRID}" stroke-width="0.5"/>')
        body.append(_text(left - 6, y + 4, f"{tick:g}", anchor="end", size=11, colour=MUTED))
    for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if not count:
            continue
        x0, x1 = scale(a), scale(b)
        h = int(count) / peak * (bottom - top)
        body.append(f'<rect x="{x0 + 0.5:.1f}" y="{bottom - h:.1f}" '
                    f'width="{max(x1 - x0 - 1, 1):.1f}" height="{h:.1f}" fill="#0969da" '
                    f'fill-opacity="0.7">'
                    f"<title>{_fmt(10 ** a)} to {_fmt(10 ** b)}: {int(count)}</title></rect>")
    for power in range(math.ceil(lo), math.floor(hi) + 1):
        x = scale(power)
        body.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" '
                    f'stroke="{MUTED}"/>')
        body.append(_text(x, bottom + 17, f"1e{power}", size=11, colour=MUTED))
    for value, name in marks:
        if not (math.isfinite(value) and value > 0):
            continue
        x = scale(min(max(math.log10(value), lo), hi))
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                    f'stroke="{INK}" stroke-dasharray="4 3"/>')
        body.append(_text(x + 4, top + 10, name, anchor="start", size=11))
    body.append(_text((left + right) / 2, height - 8, x_label, size=12, colour=MUTED))
    return _svg(width, height, body, label)


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    group: str = "other"  # colour group (module family)
    threshold: float | None = None  # drawn as a tick on the bar's row
    flagged: bool = False  # the guard reported this module (drawn in red)


def bar_chart(bars: Sequence[Bar], *, label: str, x_label: str, percent: bool = False) -> str:
    """Horizontal bars, one row each, coloured by group, with per-row threshold ticks
    (`percent`: values are fractions, labelled as percentages)."""
    fmt = _percent if percent else _fmt
    row, top, left = 16, 10, 260
    width = 720
    height = top + row * len(bars) + 40
    hi = max([b.value for b in bars] + [b.threshold or 0.0 for b in bars] + [1e-9]) * 1.05
    scale = Scale(0.0, hi, left, width - 20)
    body = []
    for tick in nice_ticks(0.0, hi, 6):
        x = scale(tick)
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - 30}" '
                    f'stroke="{GRID}" stroke-width="0.5"/>')
        body.append(_text(x, height - 16, fmt(tick), size=11, colour=MUTED))
    for i, bar in enumerate(bars):
        y = top + i * row
        colour = FAMILY_COLOURS.get(bar.group, FAMILY_COLOURS["other"])
        over = bar.flagged
        body.append(_text(left - 6, y + 12, _shorten(bar.label, 40), anchor="end", size=10,
                          colour=FAIL_COLOUR if over else INK))
        body.append(f'<rect x="{left}" y="{y + 3}" width="{max(scale(bar.value) - left, 0.5):.1f}" '
                    f'height="{row - 5}" fill="{colour}" fill-opacity="{0.95 if over else 0.6}">'
                    f"<title>{escape(bar.label)} ({escape(bar.group)}): {fmt(bar.value)}"
                    + (f", limit {fmt(bar.threshold)}" if bar.threshold is not None else "")
                    + "</title></rect>")
        if bar.threshold is not None:
            x = scale(bar.threshold)
            body.append(f'<line x1="{x:.1f}" y1="{y + 1}" x2="{x:.1f}" y2="{y + row - 1}" '
                        f'stroke="{FAIL_COLOUR}" stroke-width="2"/>')
    body.append(_text((left + width - 20) / 2, height - 2, x_label, size=12, colour=MUTED))
    return _svg(width, height, body, label)


def _percent(value: float) -> str:
    return "0" if value == 0 else f"{value * 100:.3g}%"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


@dataclass(frozen=True)
class BoundsLook:
    """One look of a confidence sequence: after `windows` values, the mean and its bounds."""

    windows: int
    mean: float
    low: float
    high: float
    decision: str  # pass | fail | continue


_DECISION_COLOURS = {"pass": PASS_COLOUR, "fail": FAIL_COLOUR, "continue": "#0969da"}


def bounds_plot(looks: Sequence[BoundsLook], *, threshold: float, threshold_label: str,
                maximum: int, planned: Sequence[int], stop_label: str, label: str,
                y_label: str) -> str:
    """A confidence sequence narrowing over its looks: each look's interval as a bar (the
    band between them shaded), the threshold as a dashed line, the stop marked, and the
    windows past the stop, never evaluated, greyed out."""
    width, height = 720, 260
    left, right, top, bottom = 64, width - 24, 24, height - 50
    if not looks:
        return _svg(width, 60, [_text(width / 2, 35, "no looks recorded", colour=MUTED)], label)
    values = [threshold, *(v for lk in looks for v in (lk.low, lk.high, lk.mean))]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 1.0
    y = Scale(lo - pad, hi + pad, bottom, top)  # pixels grow downwards
    x = Scale(0.0, float(max(maximum, looks[-1].windows)), left, right)
    stop = looks[-1].windows
    body = [f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    if stop < maximum:
        body.append(f'<rect x="{x(stop):.1f}" y="{top}" width="{right - x(stop):.1f}" '
                    f'height="{bottom - top}" fill="{MUTED}" fill-opacity="0.10"/>')
        body.append(_text((x(stop) + right) / 2, (top + bottom) / 2, "not evaluated",
                          size=11, colour=MUTED))
    for tick in nice_ticks(y.lo, y.hi, 5):
        body.append(f'<line x1="{left}" y1="{y(tick):.1f}" x2="{right}" y2="{y(tick):.1f}" '
                    f'stroke="{GRID}" stroke-width="0.5"/>')
        body.append(_text(left - 6, y(tick) + 4, _fmt(tick), anchor="end", size=11,
                          colour=MUTED))
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{MUTED}"/>')
    for tick in nice_ticks(0.0, x.hi, 8):
        body.append(f'<line x1="{x(tick):.1f}" y1="{bottom}" x2="{x(tick):.1f}" '
                    f'y2="{bottom + 4}" stroke="{MUTED}"/>')
        body.append(_text(x(tick), bottom + 17, f"{tick:g}", size=11, colour=MUTED))
    for t in planned:  # where the design allowed a look
        body.append(f'<circle cx="{x(t):.1f}" cy="{bottom}" r="2" fill="{MUTED}"/>')
    if len(looks) > 1:
        edge = [f"{x(lk.windows):.1f},{y(lk.high):.1f}" for lk in looks]
        edge += [f"{x(lk.windows):.1f},{y(lk.low):.1f}" for lk in reversed(looks)]
        body.append(f'<polygon points="{" ".join(edge)}" fill="#0969da" fill-opacity="0.10"/>')
        for side in ("low", "high"):
            points = " ".join(f"{x(lk.windows):.1f},{y(getattr(lk, side)):.1f}" for lk in looks)
            body.append(f'<polyline points="{points}" fill="none" stroke="#0969da" '
                        f'stroke-width="1.5"/>')
    if y.lo < 0.0 < y.hi:
        body.append(f'<line x1="{left}" y1="{y(0.0):.1f}" x2="{right}" y2="{y(0.0):.1f}" '
                    f'stroke="{MUTED}" stroke-dasharray="2 3"/>')
        body.append(_text(left + 4, y(0.0) + 14, "no change", anchor="start", size=11,
                          colour=MUTED))
    body.append(f'<line x1="{left}" y1="{y(threshold):.1f}" x2="{right}" '
                f'y2="{y(threshold):.1f}" stroke="{FAIL_COLOUR}" stroke-width="2" '
                f'stroke-dasharray="6 4"/>')
    body.append(_text(left + 4, y(threshold) - 6, threshold_label, anchor="start", size=11,
                      colour=FAIL_COLOUR))
    for lk in looks:
        colour = _DECISION_COLOURS.get(lk.decision, INK)
        cx = x(lk.windows)
        body.append(f'<line x1="{cx:.1f}" y1="{y(lk.low):.1f}" x2="{cx:.1f}" '
                    f'y2="{y(lk.high):.1f}" stroke="{colour}" stroke-width="3">'
                    f"<title>{lk.windows} windows: {_fmt(lk.low)} to {_fmt(lk.high)} "
                    f"({escape(lk.decision)})</title></line>")
        body.append(f'<circle cx="{cx:.1f}" cy="{y(lk.mean):.1f}" r="3.5" fill="{colour}"/>')
    colour = _DECISION_COLOURS.get(looks[-1].decision, INK)
    body.append(f'<line x1="{x(stop):.1f}" y1="{top}" x2="{x(stop):.1f}" y2="{bottom}" '
                f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="3 3"/>')
    body.append(_text(x(stop) + (4 if stop < maximum else -4), top + 10, stop_label,
                      anchor="start" if stop < maximum else "end", size=11, colour=colour,
                      weight="bold"))
    body.append(_text((left + right) / 2, height - 10, f"final windows evaluated · {y_label}",
                      size=12, colour=MUTED))
    return _svg(width, height, body, label)
