"""The guards' per-module charts in the HTML report: |z| per module against its family cap,
or each module's change of its largest singular value against the limit that would flag it.

Pure: a guard section and its policy in, chart bars or an SVG figure out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from invarlock.report import charts


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_Z_KEYS = ("abs_z", "z", "z_score")


def module_scores(section: Mapping[str, Any], policy: Mapping[str, Any]) -> list[charts.Bar]:
    """|z| per module from a guard's section, with its family's cap when known.

    `measurements.modules` is a list of {module|name, family, z|abs_z} or a mapping
    module -> {family, z|abs_z}; spectral measurements ({name, family, sigma_baseline,
    sigma_subject}) get their z from the spectral guard's own scoring when it is installed.
    Anything else yields no chart.
    """
    measurements = section.get("measurements")
    if not isinstance(measurements, Mapping):
        return []
    modules = measurements.get("modules")
    if isinstance(modules, Mapping):
        modules = [{"module": k, **v} for k, v in modules.items() if isinstance(v, Mapping)]
    if not isinstance(modules, Sequence) or isinstance(modules, str):
        return []
    entries = [m for m in modules if isinstance(m, Mapping)]
    scored = _spectral_z(entries, policy)
    caps = _family_caps(section, policy)
    reported = {str(f.get("module")) for f in section.get("findings") or []
                if isinstance(f, Mapping)}
    bars = []
    for entry in entries:
        label = str(entry.get("module") or entry.get("name") or "?")
        z = next((entry[k] for k in _Z_KEYS if is_number(entry.get(k))), scored.get(label))
        if z is None or not np.isfinite(z):
            continue
        family = str(entry.get("family", "other"))
        bars.append(charts.Bar(label, abs(float(z)), family, caps.get(family),
                               flagged=label in reported))
    return bars


def spectral_changes(section: Mapping[str, Any],
                     policy: Mapping[str, Any]) -> list[charts.Bar]:
    """|σ change| of each module against the change at which the spectral guard flags it.

    What decides a module is its relative change r = σ_s/σ_b − 1: it is a candidate when |r|
    exceeds the deadband and its robust z exceeds its family's κ, i.e. when r leaves
    median ± κ·scale of its family (the deadband alone in a family too small for a z), and
    a violation at once beyond `module_change_limit`. Each bar's tick is the smaller of the
    two limits on the side its change went; a bar past its tick is a candidate (a violation
    when its family is significant: named in red), a bar short of it is not. Empty when the
    section does not hold σ per module or the policy lacks a setting.
    """
    measurements = section.get("measurements")
    if not isinstance(measurements, Mapping):
        return []
    entries = [m for m in measurements.get("modules") or () if isinstance(m, Mapping)]
    if not entries or any(k not in entries[0] for k in ("sigma_baseline", "sigma_subject")):
        return []
    try:
        from invarlock.guards import spectral

        deadband = float(policy["deadband"])
        quantile = float(policy.get("sigma_quantile", 0.5))
        caps = {str(f): float(v) for f, v in (policy.get("family_caps") or {}).items()}
        own = policy.get("module_change_limit")
        own_limit = None if own is None else max(float(own), deadband)
        scope = spectral._scope(policy)
        floor = spectral.scale_floor(deadband)
        scores = spectral.score_modules(entries, quantile, scope, floor)
    except (ImportError, KeyError, TypeError, ValueError):
        return []
    reported = {str(f.get("module")) for f in section.get("findings") or []
                if isinstance(f, Mapping) and f.get("kind", "violation") == "violation"}
    bars = []
    for family in spectral.FAMILIES:
        members = [m for m in scores if m.family == family]
        if not members:
            continue
        r = np.array([m.r for m in members])
        touched = r[(r != 0) & np.isfinite(r)]
        robust = touched.size >= spectral.MIN_FAMILY_FOR_Z and family in caps
        centre = float(np.median(touched)) if robust else 0.0
        spread = caps[family] * spectral.robust_scale(touched, quantile, floor) if robust else 0
        for m in members:
            if not np.isfinite(m.r):
                continue
            side = centre + spread if m.r >= 0 else spread - centre  # |r| where |z| = κ
            limit = max(deadband, side)
            if own_limit is not None:
                limit = min(limit, own_limit)
            bars.append(charts.Bar(m.name, abs(m.r), family, limit,
                                   flagged=m.name in reported))
    return bars


def _spectral_z(entries: Sequence[Mapping[str, Any]],
                policy: Mapping[str, Any]) -> dict[str, float]:
    """Robust z per module, computed by the spectral guard from σ baseline/subject."""
    if not entries or any(k not in entries[0] for k in ("sigma_baseline", "sigma_subject")):
        return {}
    try:
        from invarlock.guards import spectral
    except ImportError:
        return {}
    try:
        scores = spectral.score_modules(entries, float(policy.get("sigma_quantile", 0.5)),
                                        spectral.FAMILIES)
    except (KeyError, TypeError, ValueError):
        return {}
    return {s.name: s.z for s in scores}


def _family_caps(section: Mapping[str, Any], policy: Mapping[str, Any]) -> dict[str, float]:
    caps: dict[str, float] = {}
    measurements = section.get("measurements") or {}
    for source in (policy.get("family_caps"), measurements.get("family_caps")):
        if isinstance(source, Mapping):
            caps.update({str(k): float(v) for k, v in source.items() if is_number(v)})
    for part in ("measurements", "summary"):
        families = (section.get(part) or {}).get("families")
        if isinstance(families, Mapping):
            for fam, info in families.items():
                if isinstance(info, Mapping) and is_number(info.get("kappa")):
                    caps[str(fam)] = float(info["kappa"])
    return caps


def module_chart(name: str, bars: list[charts.Bar], limit: int = 60) -> str:
    shown = sorted(bars, key=lambda b: -b.value)[:limit] if len(bars) > limit else bars
    note = (f" The {limit} largest of {len(bars)} modules are shown." if len(bars) > limit
            else "")
    svg = charts.bar_chart(shown, label=f"{name}: |z| per module", x_label="|z|")
    legend = " ".join(f'<span class="tag" style="border-color:{c};color:{c}">{f}</span>'
                      for f, c in charts.FAMILY_COLOURS.items())
    return (f"<figure>{svg}<figcaption>|z| per module, coloured by family {legend}; red ticks "
            f"mark the family cap κ; modules the guard reported are named in red.{note}"
            "</figcaption></figure>")


def change_chart(name: str, bars: list[charts.Bar], limit: int = 60) -> str:
    """The modules nearest their limit first: the chart shows what decides."""
    order = sorted(bars, key=lambda b: -(b.value / b.threshold if b.threshold else b.value))
    shown = order[:limit]
    note = (f" The {limit} modules nearest their limit of {len(bars)} are shown."
            if len(bars) > limit else "")
    svg = charts.bar_chart(shown, label=f"{name}: |σ change| per module against its limit",
                           x_label="|σ_subject / σ_baseline − 1|", percent=True)
    legend = " ".join(f'<span class="tag" style="border-color:{c};color:{c}">{f}</span>'
                      for f, c in charts.FAMILY_COLOURS.items())
    return (f"<figure>{svg}<figcaption>Change of each module's largest singular value against "
            "its own baseline (a block linear's along the calibration windows' inputs, other "
            f"matrices' in weight space), coloured by family {legend}; each tick marks the "
            "change at which that module would be flagged (the deadband, its family's "
            "κ·spread around the family's median change, or the module change limit, "
            "whichever applies first). A bar past its tick is a candidate; candidates the "
            f"guard reported as violations are named in red.{note}</figcaption></figure>")
