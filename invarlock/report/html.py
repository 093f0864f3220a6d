"""The HTML report: one self-contained page (inline CSS and SVG, no scripts, no network).

Order follows what a reviewer asks: the verdict and whether the document verifies; the one
number against its limit (interval plot); how the per-window differences are spread; the
gates; the guards (per-family tables, spectral |z| per module); the policy; provenance.

Pure: a certificate and its verification report in, a string out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape, unescape
from typing import Any

import numpy as np

from invarlock.certificate import markdown as md
from invarlock.certificate import sequential_view
from invarlock.config import flatten
from invarlock.report import charts
from invarlock.report.guard_charts import (
    change_chart,
    is_number,
    module_chart,
    module_scores,
    spectral_changes,
)
from invarlock.verify import ABS_TOL, REL_TOL, VerifyReport

_CSS = """
:root { --pass: #1a7f37; --fail: #cf222e; --ink: #1f2328; --muted: #656d76; --line: #d0d7de; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       margin: 0; background: #f6f8fa; }
main { max-width: 980px; margin: 0 auto; padding: 24px; background: #fff; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 6px; }
.verdict { border-radius: 8px; padding: 16px 20px; color: #fff; }
.verdict.pass { background: var(--pass); } .verdict.fail { background: var(--fail); }
.verdict p { margin: 4px 0 0; }
.verdict ul { margin: 8px 0 0; padding-left: 20px; }
.check { margin: 12px 0; padding: 10px 14px; border-radius: 6px; border: 1px solid var(--line); }
.check.ok { border-color: var(--pass); background: #dafbe1; }
.check.bad { border-color: var(--fail); background: #ffebe9; }
.check ul { margin: 6px 0 0; padding-left: 20px; }
.scroll { overflow-x: auto; max-width: 100%; margin: 8px 0; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv td { text-align: left; } table.kv td:first-child { width: 45%; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; word-break: break-all; }
.ok-mark { color: var(--pass); font-weight: 700; white-space: nowrap; }
.bad-mark { color: var(--fail); font-weight: 700; white-space: nowrap; }
.muted { color: var(--muted); }
.tag { display: inline-block; padding: 0 6px; border-radius: 10px; font-size: 12px;
       border: 1px solid var(--line); }
figure { margin: 8px 0; } figcaption { color: var(--muted); font-size: 13px; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
@media print { body { background: #fff; } main { padding: 0; } }
"""


def render(cert: Mapping[str, Any], verification: VerifyReport) -> str:
    """The whole page."""
    status = cert["verdict"]["status"]
    title = f"InvarLock certificate: {status}"
    parts = [
        _verdict(cert),
        _verification(verification),
        _section("Primary metric", _primary(cert)),
        *([_section("Sequential test", _sequential(cert))]
          if sequential_view.view(cert) is not None else []),
        _section("Per-window differences", _histogram(cert)),
        *([_section("Distribution evidence", _distribution(cert))]
          if cert.get("distribution") else []),
        _section("Gates", _gates(cert)),
        _section("Guards", _guards(cert)),
        _section("Policy", _policy(cert)),
        _section("Models, data and provenance", _provenance(cert)),
        f"<footer>Certificate digest <code>{escape(str(cert.get('digest')))}</code>. "
        f"Re-check it with <code>invarlock verify evaluation.cert.json</code>.</footer>",
    ]
    body = _scrollable("".join(parts))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def _scrollable(html: str) -> str:
    """Every table in a box that scrolls sideways, so a wide one (spectral and RMT per
    family) never pushes the page wider than the window nor hides columns."""
    return html.replace("<table", '<div class="scroll"><table').replace(
        "</table>", "</table></div>")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


def _verdict(cert: Mapping[str, Any]) -> str:
    status = cert["verdict"]["status"]
    reasons = ""
    if status == "FAIL":
        items = "".join(f"<li>{escape(r)}</li>" for r in cert["verdict"]["reasons"])
        reasons = f"<ul>{items}</ul>"
    sentence = md.as_text(md.summary_sentence(dict(cert)))
    return (f'<div class="verdict {status.lower()}"><h1>{"✔" if status == "PASS" else "✘"} '
            f"{escape(status)}</h1><p>{escape(sentence)}</p>{reasons}</div>")


def _verification(report: VerifyReport) -> str:
    if report.verified:
        notes = "".join(f"<li>{escape(n)}</li>" for n in report.notes)
        return (f'<div class="check ok"><strong>Verified.</strong> Recomputed from the stored '
                f"numbers: {escape(', '.join(report.checked))} (tolerance {REL_TOL:g} relative, "
                f"{ABS_TOL:g} absolute).{f'<ul>{notes}</ul>' if notes else ''}</div>")
    items = "".join(f"<li>{escape(d)}</li>" for d in report.differences[:30])
    more = len(report.differences) - 30
    extra = f"<li>… and {more} more</li>" if more > 0 else ""
    return (f'<div class="check bad"><strong>This certificate does not verify</strong> '
            f"({len(report.differences)} difference(s)); do not rely on it."
            f"<ul>{items}{extra}</ul></div>")


def _primary(cert: Mapping[str, Any]) -> str:
    pm = cert["primary_metric"]
    passed = bool(cert["validation"].get("primary_metric_acceptable"))
    figure = ""
    if pm["ratio_ci"] is not None:
        lo, hi = pm["ratio_ci"]
        figure = charts.interval_plot(
            estimate=pm["ratio"], low=lo, high=hi, limit=pm["limit"], reference=1.0,
            upper_limit=True, passed=passed,
            label="Perplexity ratio subject/baseline with its confidence interval and limit")
        caption = (f"Perplexity ratio subject/baseline with its "
                   f"{_confidence(pm)} BCa interval; PASS needs the upper bound at or "
                   f"below the limit {pm['limit']:.2f}.")
    elif pm["delta"] is not None:
        d = pm["delta"]
        figure = charts.interval_plot(
            estimate=d["estimate"], low=d["ci"][0], high=d["ci"][1], limit=pm["limit"],
            reference=0.0, upper_limit=False, passed=passed, unit=" pp", value_format="+.2f",
            label="Accuracy change with its confidence interval and limit")
        caption = (f"Accuracy change subject − baseline (percentage points) with its "
                   f"{_confidence(pm)} BCa interval; PASS needs the lower bound at or above "
                   f"{pm['limit']:+.2f} pp.")
    else:
        stopped = md.stopped_by(dict(cert))
        why = (f"the {stopped} guard failed before evaluation" if stopped
               else "catastrophic preview")
        caption = f"No interval: the final set was not evaluated ({why})."
    table = _md_table(md.metric_table(dict(cert)))
    fig = f"<figure>{figure}<figcaption>{escape(caption)}</figcaption></figure>"
    if not figure:
        return f"{fig}{table}"
    return f"{fig}{table}<p class=\"muted\">{escape(_interval_line(cert))}</p>"


def _confidence(pm: Mapping[str, Any]) -> str:
    boot = pm.get("bootstrap") or {}
    alpha = boot.get("alpha")
    return f"{(1 - alpha) * 100:g}%" if isinstance(alpha, (int, float)) else ""


_METHODS = {"bca": "BCa", "percentile": "percentile (BCa undefined)",
            "degenerate": "degenerate (every replicate equal)"}


def _interval_line(cert: Mapping[str, Any]) -> str:
    pm = cert["primary_metric"]
    boot, d = pm["bootstrap"], pm["delta"]
    if boot is None or d is None:
        return "No interval: the final set was not evaluated."
    unit = "nats/token" if d["unit"] == "nats_per_token" else "pp"
    drift = "—" if pm["drift"] is None else f"{pm['drift']:.4f}"
    return (f"Paired Δ = {d['estimate']:+.6f} {unit} (CI {d['ci'][0]:+.6f} to "
            f"{d['ci'][1]:+.6f}); {_METHODS.get(boot['method'], boot['method'])} bootstrap, "
            f"{boot['replicates']} "
            f"replicates, seed {boot['seed']}, α = {boot['alpha']}; drift final/preview {drift}.")


def _sequential(cert: Mapping[str, Any]) -> str:
    """Where the sequential test stopped and why, its bounds narrowing over the looks
    against the threshold, and the looks as a table."""
    seq = sequential_view.view(cert)
    assert seq is not None
    unit = "pp, negated" if seq.accuracy else "nats/token"
    limit = (f"limit {-seq.threshold:+.2f} pp" if seq.accuracy
             else f"ln {math.exp(seq.threshold):.2f} = {seq.threshold:+.4f}")
    stop = (f"stopped at {seq.evaluated}: {seq.decision.upper()}" if seq.early
            else f"maximum {seq.evaluated}: fixed interval decides")
    svg = charts.bounds_plot(
        [charts.BoundsLook(lk.windows, lk.mean, lk.low, lk.high, lk.decision)
         for lk in seq.looks],
        threshold=seq.threshold, threshold_label=limit, maximum=seq.maximum,
        planned=seq.planned, stop_label=stop, y_label=f"mean Δ and its bounds ({unit})",
        label="Confidence sequence bounds over the looks, with the threshold and the stop")
    caption = (f"The confidence sequence's bounds on the mean per-window difference at each "
               f"look (dots: the planned looks); PASS once the upper bound is below the "
               f"threshold after {seq.n_min} windows, FAIL once the lower bound is above it.")
    rows = "".join(
        f'<tr><td class="num">{lk.number}</td><td class="num">{lk.windows}</td>'
        f'<td class="num">{lk.mean:+.6f}</td><td class="num">{lk.low:+.6f}</td>'
        f'<td class="num">{lk.high:+.6f}</td><td>{escape(lk.decision)}</td></tr>'
        for lk in seq.looks)
    table = ("<table><tr><th class=\"num\">Look</th><th class=\"num\">Windows</th>"
             f"<th class=\"num\">Mean Δ ({escape(unit)})</th><th class=\"num\">Lower bound"
             "</th><th class=\"num\">Upper bound</th><th>Decision</th></tr>"
             f"{rows}</table>")
    return (f"<p><strong>{escape(seq.phrase[0].upper() + seq.phrase[1:])}.</strong> "
            f"{escape(seq.why)}</p>"
            f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>{table}"
            f"<p class=\"muted\">Threshold {escape(seq.limit_text)}. "
            f"{escape(seq.design_text)}</p>")


def window_deltas(cert: Mapping[str, Any]) -> tuple[str, list[float]]:
    """Per-window differences of the set the interval was computed on (final, else preview).

    Perplexity: (NLLˢ − NLLᵇ)/tokens in nats/token; accuracy: cˢ − cᵇ in {−1, 0, 1}.
    """
    windows = cert["windows"]
    name = "final" if windows["final"]["subject"] else "preview"
    ws = windows[name]
    deltas = []
    for n, b, s in zip(ws["tokens"], ws["baseline"], ws["subject"], strict=False):
        if s is None:
            continue
        deltas.append((s - b) / n if windows["kind"] != "accuracy" else s - b)
    return name, deltas


def _histogram(cert: Mapping[str, Any]) -> str:
    name, deltas = window_deltas(cert)
    if not deltas:
        return "<p>No per-window results.</p>"
    accuracy = cert["windows"]["kind"] == "accuracy"
    seq = sequential_view.view(cert)
    planned = (f" (of {seq.maximum} planned: the sequential test stopped there)"
               if seq is not None and name == "final" and seq.evaluated < seq.maximum else "")
    if accuracy:
        counts = {k: sum(1 for d in deltas if d == k) for k in (-1.0, 0.0, 1.0)}
        rows = "".join(f"<tr><td>{label}</td><td class=\"num\">{counts[k]}</td></tr>"
                       for k, label in ((1.0, "subject right, baseline wrong"),
                                        (0.0, "both agree"),
                                        (-1.0, "subject wrong, baseline right")))
        return (f"<p>Paired outcomes on the {name} set ({len(deltas)} examples evaluated"
                f"{planned}):</p>"
                f"<table><tr><th>Outcome</th><th>Examples</th></tr>{rows}</table>")
    mean = float(np.mean(deltas))
    weighted = cert["primary_metric"]["delta"]
    marks = [(mean, "mean")]
    if weighted is not None and name == "final":
        marks = [(weighted["estimate"], "token-weighted mean")]
    svg = charts.histogram(deltas, label=f"Histogram of per-window log-loss differences, "
                                         f"{name} set", x_label="Δ log-loss per token "
                                         "(subject − baseline, nats)", marks=marks)
    worse = sum(1 for d in deltas if d > 0)
    return (f"<figure>{svg}<figcaption>{len(deltas)} {name} windows evaluated{planned}; "
            f"{worse} where the subject is worse than the baseline.</figcaption></figure>")


def _distribution(cert: Mapping[str, Any]) -> str:
    """Per-token KL divergence as a log-scale histogram, then llama.cpp's statistics."""
    d = cert["distribution"]
    hist = d["histogram"]
    svg = charts.log_histogram(
        hist["log10_edges"], hist["counts"],
        label=f"Histogram of per-token KL divergence, {d['set']} set",
        x_label="KL(baseline ‖ subject) per token (nats, log scale)",
        marks=[(d["kld_mean"]["estimate"], "mean"), (d["kld"]["p99"], "99%")])
    outside = (f" {hist['below']} tokens below 1e{hist['log10_edges'][0]:g} (identical "
               f"included) and {hist['above']} above 1e{hist['log10_edges'][-1]:g} are not "
               "drawn." if hist["below"] or hist["above"] else "")
    return (f"<figure>{svg}<figcaption>{d['tokens']} scored tokens of the {escape(d['set'])} "
            f"set.{escape(outside)}</figcaption></figure>"
            f"<p>{escape(md.as_text(md.distribution_summary(dict(cert))))}</p>"
            + _md_table("\n".join(md.distribution_limits(dict(cert))))
            + _md_table("\n".join(md.distribution_table(dict(d)))))


def _mark(ok: Any) -> str:
    return ('<span class="ok-mark">✔ pass</span>' if ok is True
            else '<span class="bad-mark">✘ fail</span>')


def _gates(cert: Mapping[str, Any]) -> str:
    gating = set(cert["gating"])
    explanations = cert["verdict"].get("explanations", {})
    rows = []
    for flag, ok in cert["validation"].items():
        mark = _mark(ok)
        role = "gate" if flag in gating else "monitor"
        rows.append(f"<tr><td><code>{escape(flag)}</code></td><td>{mark}</td>"
                    f"<td><span class=\"tag\">{role}</span></td>"
                    f"<td>{escape(explanations.get(flag, ''))}</td></tr>")
    return ("<table><tr><th>Check</th><th>Result</th><th>Role</th><th>Detail</th></tr>"
            f"{''.join(rows)}</table>")


# --- guards ---------------------------------------------------------------------------------

def _guards(cert: Mapping[str, Any]) -> str:
    guards = cert.get("guards") or {}
    if not guards:
        return "<p class=\"muted\">No guard results in this certificate.</p>"
    policy_guards = (cert["policy"]["values"].get("guards") or {})
    return "".join(_guard(name, section, policy_guards.get(name) or {})
                   for name, section in guards.items())


def _guard(name: str, section: Mapping[str, Any], policy: Mapping[str, Any]) -> str:
    mark = _mark(section.get("passed"))
    head = (f"<h3>{escape(name)} {mark} <span class=\"tag\">{escape(str(section.get('mode')))}"
            f"</span></h3><p>{escape(str(section.get('reason', '')))}</p>")
    parts = [head]
    for part in ("summary", "measurements"):  # derived numbers first, then the raw ones
        data = section.get(part)
        if not isinstance(data, Mapping):
            continue
        families = data.get("families")
        if isinstance(families, Mapping) and families:
            parts.append(f"<p class=\"muted\">Per family ({part})</p>"
                         + _dict_table(families, "family"))
        scalars = {k: v for k, v in data.items() if _is_scalar(v)}
        if scalars:
            parts.append(_kv_table(scalars))
    changes = spectral_changes(section, policy)
    bars = [] if changes else module_scores(section, policy)
    if changes:
        parts.append(change_chart(name, changes))
    elif bars:
        parts.append(module_chart(name, bars))
    findings = section.get("findings") or []
    if findings:
        parts.append(_findings_tables(findings))
    return "".join(parts)


def _findings_tables(findings: Sequence[Any]) -> str:
    by_family: dict[str, list[Mapping[str, Any]]] = {}
    for item in findings:
        if isinstance(item, Mapping):
            by_family.setdefault(str(item.get("family", "other")), []).append(item)
    parts = []
    for family in sorted(by_family):
        rows = by_family[family]
        extra = {k for r in rows for k in r if _is_scalar(r[k])} - {"module", "message", "family"}
        keys = ["module", "message", *sorted(extra)]
        head = "".join(f"<th>{escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(_cell(r.get(k)) for k in keys) + "</tr>" for r in rows)
        parts.append(f"<p class=\"muted\">Findings: {escape(family)} ({len(rows)})</p>"
                     f"<table><tr>{head}</tr>{body}</table>")
    return "".join(parts)


def _dict_table(rows: Mapping[str, Any], first: str) -> str:
    keys = sorted({k for v in rows.values() if isinstance(v, Mapping) for k in v
                   if _is_scalar(v[k])})
    numeric = {k for k in keys if all(is_number(v.get(k)) for v in rows.values()
                                      if isinstance(v, Mapping) and k in v)}
    head = f"<th>{escape(first)}</th>" + "".join(
        (f'<th class="num">{escape(k)}</th>' if k in numeric else f"<th>{escape(k)}</th>")
        for k in keys)
    body = []
    for name, value in rows.items():
        cells = "".join(_cell(value.get(k)) if isinstance(value, Mapping) else _cell(None)
                        for k in keys)
        if not isinstance(value, Mapping):
            cells = _cell(value)
        body.append(f"<tr><td>{escape(str(name))}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _kv_table(values: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td><code>{escape(str(k))}</code></td>{_cell(v)}</tr>"
                   for k, v in values.items())
    return f"<table class=\"kv\">{rows}</table>"


def _cell(value: Any) -> str:
    if is_number(value):
        return f'<td class="num">{escape(_num(value))}</td>'
    if isinstance(value, bool):
        return f"<td>{'✔' if value else '✘'}</td>"
    if value is None:
        return "<td class=\"muted\">—</td>"
    if isinstance(value, (list, tuple)) and all(_is_scalar(v) for v in value):
        return f"<td>{escape(', '.join(_num(v) if is_number(v) else str(v) for v in value))}</td>"
    return f"<td>{escape(str(value))}</td>"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool)) or (
        isinstance(value, (list, tuple)) and len(value) <= 8
        and all(isinstance(v, (str, int, float, bool)) for v in value))


def _num(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


# --- policy and provenance ------------------------------------------------------------------

def _policy(cert: Mapping[str, Any]) -> str:
    policy = cert["policy"]
    overrides = set(policy["overrides"])
    rows = []
    for key, value in flatten(policy["values"]).items():
        tag = ' <span class="tag">override</span>' if key in overrides else ""
        rows.append(f"<tr><td><code>{escape(key)}</code>{tag}</td>{_cell(value)}</tr>")
    return (f"<p>Tier <strong>{escape(policy['tier'])}</strong>, profile "
            f"<strong>{escape(policy['profile'])}</strong>; policy digest "
            f"<code>{escape(policy['digest'])}</code>.</p>"
            f"<table class=\"kv\"><tr><th>Value</th><th>Setting</th></tr>{''.join(rows)}"
            "</table>")


def _provenance(cert: Mapping[str, Any]) -> str:
    return (_md_table(md.models_table(dict(cert)))
            + _md_table(md.provenance_table(dict(cert))))


def _md_table(text: str) -> str:
    """A pipe table from the Markdown renderer, as HTML (inline `code` kept)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return ""
    header, rows = _cells(lines[0]), [_cells(ln) for ln in lines[2:]]
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
    head_row = f"<tr>{head}</tr>" if any(c.strip() for c in header) else ""
    return f"<table>{head_row}{body}</table>"


def _cells(line: str) -> list[str]:
    cells, current, escaped = [], [], False
    for ch in line.strip()[1:-1]:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "|":
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    cells.append("".join(current).strip())
    return [unescape(c) for c in cells]  # the renderer writes < > & as entities


def _inline(text: str) -> str:
    """Markdown `code` and **bold** spans to HTML; everything else escaped."""
    out, parts = [], text.split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{escape(part)}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<strong>{escape(b)}</strong>" if j % 2 else escape(b)
                               for j, b in enumerate(bold)))
    return "".join(out)
