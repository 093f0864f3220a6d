"""Markdown rendering of a certificate for people: the verdict and the one number first.

A certificate's digest authenticates nothing (anyone can edit a field and recompute it), so
every string taken from it (names, sources, reasons, the device, versions, keys) goes
through `invarlock.untrusted.markdown` and renders as exactly its characters: no HTML, no
links, no code spans, no line breaks, no table cells of its own. Only a string made of
identifier characters (a flag, a module, a path, a digest) goes inside a code span, where
escapes do not work; anything else is shown as escaped text. `format_line` returns plain
text; callers escape it for their medium.

Pure: a certificate dict in, a string out (no I/O, no environment).
"""

from __future__ import annotations

import html
import re
from typing import Any

from invarlock import untrusted
from invarlock.certificate import sequential_view

_MARK = {True: "✅", False: "❌"}
_METHOD = {"bca": "BCa", "percentile": "percentile", "degenerate": "zero-width"}


def render(cert: dict[str, Any]) -> str:
    """The full `evaluation.cert.md`: headline, gates, metric table, models, provenance."""
    parts = [
        headline(cert),
        "",
        "## Gates",
        "",
        gates_table(cert),
        "",
        "## Primary metric",
        "",
        metric_table(cert),
        "",
        _interval_line(cert),
        "",
        *distribution_lines(cert),
        *sequential_section(cert),
        *guard_findings(cert),
        "## Models and data",
        "",
        models_table(cert),
        "",
        "## Provenance",
        "",
        provenance_table(cert),
        "",
    ]
    return "\n".join(parts)


def headline(cert: dict[str, Any]) -> str:
    """Title with the verdict, then the one number that matters against its limit."""
    status = cert["verdict"]["status"]
    icon = "✅" if status == "PASS" else "❌"
    lines = [f"# {icon} InvarLock certificate: {_t(status)}", "", summary_sentence(cert)]
    if status == "FAIL":
        lines += ["", *[f"- {_t(r, _LONG)}" for r in cert["verdict"]["reasons"]]]
    return "\n".join(lines)


def stopped_by(cert: dict[str, Any]) -> str | None:
    """The guard that stopped the run before evaluation (a fatal check failed), if one did:
    the final set was not evaluated, that guard measured and failed, no other guard measured.
    """
    if cert["pairing"]["final_evaluated"]:
        return None
    guards = cert.get("guards") or {}
    measured = [name for name, g in guards.items()
                if (g.get("measurements") or {}).get("evaluated", True) is not False]
    if len(measured) != 1 or guards[measured[0]]["passed"]:
        return None
    return measured[0]


def summary_sentence(cert: dict[str, Any]) -> str:
    """The one number against its limit; a warning when the evidence is below the profile."""
    sentence = _metric_sentence(cert)
    decided = decided_phrase(cert)
    if decided:
        sentence += f" Sequential test: {decided}."
    evidence = cert.get("evidence") or {}
    if evidence.get("meets_profile") is False:
        sentence += (f" ⚠️ Evidence below the {_t(evidence['profile'])} profile: "
                     f"{'; '.join(_t(s) for s in evidence['shortfalls'])}.")
    return sentence


def _metric_sentence(cert: dict[str, Any]) -> str:
    pm = cert["primary_metric"]
    tier = _t(cert["policy"]["tier"])
    if pm["gate_value"] is None:
        stopped = stopped_by(cert)
        if stopped:
            return (f"**Stopped**: the {_t(stopped)} guard failed before evaluation; the final set "
                    f"was not evaluated ({tier} tier).")
        if pm["catastrophic"]:
            prev = pm["preview"]["ratio"]
            shown = "non-finite" if prev is None else f"{prev:.3f}"
            return (f"**Catastrophic degradation**: preview ratio {shown}; the final set was "
                    f"not evaluated ({tier} tier).")
        return "The primary metric could not be computed."
    if pm["basis"] == "ratio_ci_upper":
        lo, hi = pm["ratio_ci"]
        op = "≤" if hi <= pm["limit"] else ">"
        return (f"**Perplexity ratio {pm['ratio']:.4f}** ({_level(pm)} CI {lo:.4f}–{hi:.4f}); "
                f"upper bound **{hi:.4f} {op} {pm['limit']:.2f}** ({tier} tier).")
    d = pm["delta"]
    lo = d["ci"][0]
    op = "≥" if lo >= pm["limit"] else "<"
    return (f"**Accuracy change {d['estimate']:+.2f} pp** ({_level(pm)} CI {d['ci'][0]:+.2f} to "
            f"{d['ci'][1]:+.2f}); lower bound **{lo:+.2f} {op} {pm['limit']:+.2f} pp** "
            f"({tier} tier).")


def decided_phrase(cert: dict[str, Any]) -> str | None:
    """Where the sequential test stopped ("decided after N of M windows (PASS)"), as inline
    Markdown; None without a sequential section."""
    seq = sequential_view.view(cert)
    return None if seq is None else _t(seq.phrase)


def sequential_section(cert: dict[str, Any], level: int = 2) -> list[str]:
    """Every look of the sequential test (windows, bounds, decision), why it stopped where
    it did, then the design."""
    seq = sequential_view.view(cert)
    if seq is None:
        return []
    unit = "pp, negated" if seq.accuracy else "nats/token"
    rows = ["#" * level + " Sequential test", "",
            f"**{_t(seq.phrase)}.** {_t(seq.why, _LONG)}", "",
            f"| Look | Windows | Mean Δ ({unit}) | Lower bound | Upper bound | Decision |",
            "|---:|---:|---:|---:|---:|---|"]
    for look in seq.looks:
        rows.append(f"| {look.number} | {look.windows} | {look.mean:+.6f} | "
                    f"{look.low:+.6f} | {look.high:+.6f} | {_t(look.decision)} |")
    rows += ["", f"Threshold {_t(seq.limit_text)}. {_t(seq.design_text, _LONG)}", ""]
    return rows


def _level(pm: dict[str, Any]) -> str:
    """Confidence level of the interval, from the recorded alpha (95% for alpha 0.05)."""
    alpha = pm["bootstrap"]["alpha"] if pm.get("bootstrap") else 0.05
    return f"{100 * (1 - alpha):g}%"


def gates_table(cert: dict[str, Any]) -> str:
    gating = set(cert["gating"])
    explanations = cert["verdict"].get("explanations", {})
    rows = ["| Check | Result | Gating | Detail |", "|---|---|---|---|"]
    for flag, ok in cert["validation"].items():
        rows.append(f"| {_code(flag)} | {_MARK[bool(ok)]} | "
                    f"{'gate' if flag in gating else 'monitor'} | "
                    f"{_t(explanations.get(flag, ''), _LONG)} |")
    return "\n".join(rows)


def metric_table(cert: dict[str, Any]) -> str:
    pm = cert["primary_metric"]
    ppl = pm["kind"] != "accuracy"
    unit = "PPL" if ppl else "accuracy"
    rows = [f"| Set | Windows | Baseline {unit} | Subject {unit} | Ratio |",
            "|---|---:|---:|---:|---:|"]
    for name in ("preview", "final"):
        summary = pm[name]
        ws = cert["windows"][name]
        n = len(ws["ids"])
        if 0 < len(ws["subject"]) < n:  # the sequential test stopped early
            n = f"{len(ws['subject'])} of {n}"
        if summary is None:
            rows.append(f"| {name} | {n} | — | not evaluated | — |")
            continue
        rows.append(f"| {name} | {n} | {_num(summary['baseline'])} | "
                    f"{_num(summary['subject'])} | {_num(summary['ratio'])} |")
    return "\n".join(rows)


def _interval_line(cert: dict[str, Any]) -> str:
    pm = cert["primary_metric"]
    boot = pm["bootstrap"]
    if boot is None:
        return "No interval: the final set was not evaluated."
    d = pm["delta"]
    unit = "nats/token" if d["unit"] == "nats_per_token" else "pp"
    drift = pm["drift"]
    return (f"Paired Δ = {d['estimate']:+.6f} {unit} (CI {d['ci'][0]:+.6f} to "
            f"{d['ci'][1]:+.6f}); {_t(_METHOD.get(boot['method'], boot['method']))} bootstrap, "
            f"{_t(boot['replicates'])} replicates, seed {_t(boot['seed'])}, "
            f"α = {_t(boot['alpha'])}; drift final/preview "
            f"{'—' if drift is None else f'{drift:.4f}'}.")


_KLD_ROWS = (("median", "Median KLD"), ("p90", "90.0% KLD"), ("p95", "95.0% KLD"),
             ("p99", "99.0% KLD"), ("p99_9", "99.9% KLD"), ("max", "Maximum KLD"))
_DP_ROWS = (("max", "Maximum Δp"), ("p99", "99.0% Δp"), ("p95", "95.0% Δp"),
            ("median", "Median Δp"), ("p5", "5.0% Δp"), ("p1", "1.0% Δp"),
            ("min", "Minimum Δp"))


_LIMITED = {"kld_mean": ("Mean KLD (CI upper bound)", "≤", 1.0, 6, ""),
            "same_top_p": ("Same top p (CI lower bound)", "≥", 100.0, 3, "%"),
            "kld_p99": ("99.0% KLD", "≤", 1.0, 6, "")}


def _limited(cert: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(check, role) per recorded quantity: `gate` where a limit is set and
    `distribution_acceptable` is a gating flag, else `monitor`. The numbers decide what is
    formatted as a number; a status is text like any other."""
    d = cert.get("distribution") or {}
    gating = "distribution_acceptable" in (cert.get("gating") or [])
    out = []
    for c in d.get("checks") or []:
        if c.get("name") in _LIMITED and isinstance(c.get("bound"), (int, float)):
            limited = isinstance(c.get("limit"), (int, float))
            out.append((c, "gate" if limited and gating else "monitor"))
    return out


def distribution_limits(cert: dict[str, Any]) -> list[str]:
    """One row per limited quantity: its bound, the tier's limit, whether it gates the
    verdict or is only monitored (no calibrated limit), and the outcome."""
    rows = ["| Quantity | Bound | Limit | Role | Result |", "|---|---:|---:|---|---|"]
    for c, role in _limited(cert):
        label, op, scale, digits, unit = _LIMITED[c["name"]]
        bound = f"{c['bound'] * scale:.{digits}f}{unit}"
        if not isinstance(c.get("limit"), (int, float)):
            rows.append(f"| {label} | {bound} | — | {role} | no calibrated limit |")
            continue
        mark = {"pass": _MARK[True], "fail": _MARK[False]}.get(c.get("status"), "")
        rows.append(f"| {label} | {bound} | {op} {c['limit'] * scale:.{digits}f}{unit} | "
                    f"{role} | {mark} {_t(c.get('status'))} |")
    return rows


def distribution_table(d: dict[str, Any]) -> list[str]:
    """llama.cpp's `--kl-divergence` statistics, with the intervals over windows."""

    def ci(x: dict[str, Any], scale: float = 1.0, digits: int = 6, unit: str = "") -> str:
        return (f"{x['estimate'] * scale:.{digits}f}{unit} (CI {x['low'] * scale:.{digits}f} "
                f"to {x['high'] * scale:.{digits}f}{unit})")

    return ["| Statistic | Value |", "|---|---:|",
            f"| Mean KLD | {ci(d['kld_mean'])} |",
            *[f"| {label} | {d['kld'][key]:.6f} |" for key, label in _KLD_ROWS],
            f"| Mean KLD (subject ‖ baseline) | {d['kld_reverse_mean']:.6f} |",
            f"| Same top p | {ci(d['same_top_p'], 100.0, 3, '%')} |",
            f"| Mean Δp | {d['delta_p_mean'] * 100:+.3f}% |",
            *[f"| {label} | {d['delta_p'][key] * 100:+.3f}% |" for key, label in _DP_ROWS],
            f"| RMS Δp | {d['delta_p_rms'] * 100:.3f}% |"]


def distribution_summary(cert: dict[str, Any]) -> str:
    """One sentence: what KLD is here, and which quantities gate and which are monitored."""
    d = cert["distribution"]
    roles = _limited(cert)
    gated = [_LIMITED[c["name"]][0] for c, role in roles if role == "gate"]
    monitored = [_LIMITED[c["name"]][0] for c, role in roles if role == "monitor"]
    said = (f"Gated by the tier: {', '.join(gated)}" if gated
            else "Monitor-only: no tier limit gates the distribution evidence")
    if gated and monitored:
        said += f"; monitor-only: {', '.join(monitored)}"
    return (f"KLD = KL(baseline ‖ subject) per scored token, nats, on the {_t(d['set'])} set "
            f"({d['tokens']:,} tokens; the baseline's top {d['top_k']} log-probabilities per "
            f"token); intervals: BCa over windows. {said}.")


def distribution_lines(cert: dict[str, Any], level: int = 2) -> list[str]:
    """The distribution evidence: which limits gate, then the statistics as llama.cpp's
    `--kl-divergence` prints them; nothing when the certificate has none."""
    d = cert.get("distribution")
    if not d:
        return []
    return ["#" * level + " Distribution evidence", "", distribution_summary(cert), "",
            *distribution_limits(cert), "", *distribution_table(d), ""]


MAX_FINDINGS = 10


def guard_findings(cert: dict[str, Any], level: int = 2) -> list[str]:
    """The guard chain: one row per guard, per-family numbers, then its findings.

    `level` is the heading level of the "Guards" heading (the PR comment nests it deeper).
    """
    sections = cert.get("guards") or {}
    if not sections:
        return []
    lines = ["#" * level + " Guards", "", "| Guard | Mode | Result | Detail |",
             "|---|---|---|---|"]
    for name, g in sections.items():
        lines.append(f"| {_t(name)} | {_t(g['mode'])} | {_MARK[bool(g['passed'])]} "
                     f"{_code(g['flag'])} | {_t(g['reason'], _LONG)} |")
    lines.append("")
    for name, g in sections.items():
        detail = _guard_families(name, g.get("summary") or {})
        findings = g.get("findings") or []
        if not detail and not findings:
            continue
        lines += ["#" * (level + 1) + f" {_t(name)}", "", *detail]
        if detail and findings:
            lines.append("")
        for f in findings[:MAX_FINDINGS]:
            family = f" ({_t(f['family'])})" if f.get("family") else ""
            kind = f"{_t(f['kind'])}: " if f.get("kind") else ""
            lines.append(f"- {_code(f['module'])}{family}: {kind}{_t(f['message'], _LONG)}")
        if len(findings) > MAX_FINDINGS:
            lines.append(f"- … and {len(findings) - MAX_FINDINGS} more in the JSON certificate")
        lines.append("")
    return lines


def _guard_families(name: str, summary: dict[str, Any]) -> list[str]:
    families = summary.get("families") or {}
    if name == "spectral" and families:
        rows = ["| Family | Modules | κ | top z | max abs(σ change) | Screen |",
                "|---|---:|---:|---:|---:|---|"]
        for fam, v in families.items():
            z = "—" if v["top_z"] is None else f"{v['top_z']:+.2f}"
            change = "—" if v["max_abs_change"] is None else f"{v['max_abs_change']:.2%}"
            rows.append(f"| {_t(fam)} | {_t(v['modules'])} | {v['kappa']:.2f} | {z} "
                        f"({_code(v['top_module'])}) | {change} | "
                        f"{'significant' if v['rejected'] else '—'} |")
        return rows
    if name == "rmt" and families:
        rows = ["| Family | Modules | Outliers beyond the MP edge (baseline → subject) | "
                "Excess | Null margin (spread) |", "|---|---:|---:|---:|---:|"]
        for fam, v in families.items():
            rows.append(f"| {_t(fam)} | {_t(v['modules'])} | {_t(v['baseline_outliers'])} → "
                        f"{_t(v['subject_outliers'])} | {v['excess']:+.0f} | {v['margin']:.1f} "
                        f"({v['null_spread']:.2f}) |")
        return rows
    return []


def models_table(cert: dict[str, Any]) -> str:
    base, subj, data, win = cert["baseline"], cert["subject"], cert["dataset"], cert["windows"]
    rows = ["| | |", "|---|---|",
            f"| Baseline | {_model(base)} |",
            f"| Subject | {_model(subj)} |"]
    rows += [f"| {role} format | {_t(format_line(m['format']), _LONG)} |"
             for role, m in (("Baseline", base), ("Subject", subj)) if m.get("format")]
    edit = cert.get("edit")
    if edit:
        plan = ", ".join(f"{k}={v}" for k, v in edit["plan"].items()
                         if v is not None and not isinstance(v, list))
        rows.append(f"| Edit | {_code(edit['name'])} ({_t(plan, _LONG)}); "
                    f"{len(edit['modules_changed'])} modules, {edit['params_changed']:,} "
                    "parameters changed |")
    rows += [
        f"| Data | {_code(data['spec'])} · {data['documents']:,} documents · "
        f"{data['tokens']:,} tokens · {_code(_short(data['digest']))} |",
        f"| Windows | {cert['pairing']['preview_n']} preview + {cert['pairing']['final_n']} "
        f"final × {win['seq_len']} tokens (stride {win['stride']}, seed {win['seed']}); "
        f"match {cert['pairing']['match']:.2f}, overlap {cert['pairing']['overlap']:.2f} |",
        f"| Tokenizer | {_t(cert['tokenizer']['class'])} · vocab "
        f"{cert['tokenizer']['vocab_size']:,} · {_code(_short(cert['tokenizer']['hash']))} |",
    ]
    return "\n".join(rows)


def provenance_table(cert: dict[str, Any]) -> str:
    env = cert["environment"]
    policy = cert["policy"]
    libs = ", ".join(f"{_t(k)} {_t(v)}" for k, v in env["libraries"].items() if v)
    overrides = ", ".join(_code(o) for o in policy["overrides"]) or "none"
    seeds = ", ".join(f"{_t(k)} {_t(v)}" for k, v in cert["seeds"].items())
    rows = ["| | |", "|---|---|",
            f"| Run | {_code(cert['run_id'])} · {_t(cert['created_at'])} |",
            f"| Tool | invarlock {_t(cert['tool']['version'])} |",
            f"| Policy | {_t(policy['tier'])} / {_t(policy['profile'])} · "
            f"{_code(_short(policy['digest']))} · overrides: {overrides} |",
            f"| Device | {_t(env['device']['type'])} ({_t(env['device']['name'])}), "
            f"{_t(env['device']['threads'])} threads |",
            f"| Environment | Python {_t(env['python'])}; {libs} |",
            f"| Seeds | {seeds} |",
            f"| Certificate digest | {_code(cert.get('digest', 'unsealed'))} |"]
    return "\n".join(rows)


def format_line(fmt: dict[str, Any]) -> str:
    """One line on how a quantized / GGUF checkpoint is stored and how it was evaluated."""
    kind = (f"GGUF {fmt.get('file_type', '')}".strip() if fmt["name"] == "gguf"
            else f"{fmt['method']} (Hugging Face quantization)")
    bits = f"{fmt['bits']}-bit" if fmt.get("bits") else "bits not stated"
    group = f", groups of {fmt['group_size']}" if fmt.get("group_size") else ""
    backend = " ".join(str(x) for x in (fmt.get("backend"), fmt.get("backend_version")) if x)
    forward = ("quantized kernels" if fmt["forward"] == "quantized-kernels"
               else "dequantized float weights"
               + (" (--dequantize)" if fmt.get("dequantize_requested") else ""))
    runtime = fmt.get("runtime")
    if isinstance(runtime, dict) and runtime.get("name") == "llama.cpp":
        forward = (f"llama.cpp's own kernels ({'+'.join(map(str, runtime.get('backends') or []))}"
                   f", {runtime.get('threads')} threads, context {runtime.get('n_ctx')})")
    digests = len(fmt.get("module_digests") or {})
    tail = f" · {digests} module digests" if digests else ""
    return (f"{kind} · {bits}{group} · {backend or 'no backend'} · evaluated with "
            f"{forward}{tail}")


def _model(m: dict[str, Any]) -> str:
    cached = " · baseline results from cache" if m.get("results_from_cache") else ""
    return (f"{_code(m['source'])} · {_t(m['architecture'])} · {m['parameters']:,} "
            f"parameters · {_t(m['dtype'])} · {_code(_short(m['weights_digest']))}{cached}")


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def _short(digest: str) -> str:
    digest = str(digest)
    return digest[:19] + "…" if len(digest) > 20 else digest


_LONG = 1000  # characters of a reason, message or format line; other fields get the default


def _t(text: Any, limit: int = untrusted.DEFAULT_LIMIT) -> str:
    """A string from the certificate as inert inline Markdown (one line, literal text)."""
    return untrusted.markdown(text, limit)


# Identifiers, paths and digests: nothing in them a code span or a table could read
# (no backtick, pipe, space or line break), and no `::` or `#` for a CI log to read.
_CODE_SAFE = re.compile(r"[A-Za-z0-9_./+-][A-Za-z0-9_./:+@=,…-]{0,199}")


def _code(text: Any) -> str:
    """A code span for an identifier, a path or a digest as certify writes them; any other
    string as escaped text, since escapes do not work inside a code span."""
    s = str(text)
    if _CODE_SAFE.fullmatch(s) and "::" not in s:
        return f"`{s}`"
    return _t(s)


_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")


def as_text(markdown: str) -> str:
    """Inline Markdown from this module back to the characters it shows, for renderings
    that escape for their own medium (the HTML report): escapes undone, entities decoded,
    the zero-width spaces that break links removed, `**` emphasis dropped."""
    text = _ESCAPED.sub(r"\1", markdown.replace("**", "").replace("\u200b", ""))
    return html.unescape(text)
