"""Markdown for reviewers: the PR comment, the check run and the job summary.

Pure: an Outcome and a few links in, strings out (no I/O, no environment). Every report leads
with the verdict and the one number that decides it (the ratio's upper bound against the
limit, or for classifiers the lower bound of the accuracy change), then the gates, guard
findings and a chart of the per-window deltas. The certificate's own tables come from
`invarlock.certificate.markdown`; this module only arranges them and adds what a pull request
needs (links, truncation within GitHub's limits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from invarlock import untrusted
from invarlock.certificate import markdown as cert_md
from invarlock.certificate import sequential_view
from invarlock.github import origin
from invarlock.github.charts import (
    bounds_chart,
    delta_chart,
    gate_chart,
)
from invarlock.github.checks import OUTPUT_LIMIT, CheckOutput
from invarlock.github.outcome import EXIT_EVIDENCE, EXIT_INPUT, Outcome

_EXIT_MEANING = {EXIT_INPUT: "bad input or configuration",
                 EXIT_EVIDENCE: "the evidence could not be produced"}


@dataclass(frozen=True)
class Links:
    """Where the reader can find more; any of them may be missing."""

    run_url: str | None = None
    check_url: str | None = None
    artifact_name: str | None = None
    head_sha: str | None = None  # the commit that was certified
    html_report: str | None = None  # file name of the HTML report inside the artifact


@dataclass(frozen=True)
class Report:
    check_name: str
    outcome: Outcome
    links: Links


# ----------------------------------------------------------------------------- entry points


def title(report: Report) -> str:
    """One line: the verdict and the deciding number (the check run's title)."""
    outcome = report.outcome
    if outcome.verdict is None:
        return (f"Could not certify (exit {outcome.exit_code}): "
                f"{untrusted.plain(_first_line(outcome.error))}")
    pm = outcome.primary_metric
    assert pm is not None
    status = str(outcome.verdict)
    if pm["gate_value"] is None:
        if pm["catastrophic"]:
            prev = pm["preview"]["ratio"]
            shown = "non-finite" if prev is None else f"{prev:.3f}"
            return f"{status}: catastrophic preview ratio {shown}"
        return f"{status}: primary metric not computed"
    seq = sequential_view.view(outcome.certificate or {})
    decided = f"; {untrusted.plain(seq.phrase)}" if seq is not None else ""
    if pm["basis"] == "ratio_ci_upper":
        hi = pm["ratio_ci"][1]
        op = "≤" if hi <= pm["limit"] else ">"
        return (f"{status}: ratio {pm['ratio']:.4f}, upper bound {hi:.4f} {op} "
                f"{pm['limit']:.2f}{decided}")
    lo = pm["delta"]["ci"][0]
    op = "≥" if lo >= pm["limit"] else "<"
    return (f"{status}: accuracy change lower bound {lo:+.2f} {op} {pm['limit']:+.2f} pp"
            f"{decided}")


def comment(report: Report, limit: int) -> str:
    """The sticky PR comment body (without the marker line), at most `limit` characters."""
    return fit(sections(report), footer(report), limit, _truncation_notice(report))


def job_summary(report: Report) -> str:
    """The job summary: the same report (its size is bounded by the caller in bytes)."""
    return "\n\n".join([*sections(report), footer(report)]) + "\n"


def check_output(report: Report) -> CheckOutput:
    """Title, summary (the report) and text (the reference, then the whole certificate) of
    the check run."""
    summary = fit(sections(report), footer(report), OUTPUT_LIMIT, _truncation_notice(report))
    text = ""
    cert = report.outcome.certificate
    if cert is not None:
        full = cert_md.render(cert)
        text = fit([origin.table(cert), full], "", OUTPUT_LIMIT, _truncation_notice(report))
    return CheckOutput(title(report), summary, text)


def short_report(report: Report) -> str:
    """A few lines for when GitHub refuses the full report: headline and links only."""
    return "\n\n".join([headline(report), footer(report)]) + "\n"


# ----------------------------------------------------------------------------- sections


def sections(report: Report) -> list[str]:
    """The report in reading order; later sections are the first to go when space is short."""
    outcome = report.outcome
    if outcome.certificate is None:
        return [headline(report)]
    cert = outcome.certificate  # the certificate's renderers escape every string they take
    chart = gate_chart(cert)
    return [
        headline(report),
        *([chart] if chart else []),
        "#### Gates\n\n" + cert_md.gates_table(cert),
        origin.table(outcome.certificate),
        "#### Primary metric\n\n" + cert_md.metric_table(cert),
        *([sequential_report(cert)] if cert.get("sequential") else []),
        *(["\n".join(cert_md.distribution_lines(cert, level=4)).rstrip()]
          if cert.get("distribution") else []),
        guard_findings(cert),
        "#### Per-window deltas\n\n" + delta_chart(cert),
        "<details><summary>Models, data and provenance</summary>\n\n"
        + cert_md.models_table(cert) + "\n\n" + cert_md.provenance_table(cert)
        + "\n\n</details>",
    ]


def headline(report: Report) -> str:
    outcome = report.outcome
    name = _plain(report.check_name)
    if outcome.certificate is None:
        meaning = _EXIT_MEANING.get(outcome.exit_code, "the certifier did not finish")
        lines = (outcome.error or "").strip().splitlines()[-20:]
        error = "  \n".join(untrusted.markdown(line, limit=2000) for line in lines
                             if line.strip())
        return "\n\n".join(filter(None, [
            f"### ⚠️ {name}: could not certify",
            f"The certifier stopped with exit code {outcome.exit_code} ({meaning}); no verdict "
            "was reached.",
            error,
        ]))
    cert = outcome.certificate
    status = cert["verdict"]["status"]
    icon = "✅" if status == "PASS" else "❌"
    base, subj = cert["baseline"], cert["subject"]
    subject = (_plain(subj["source"]) if subj.get("produced_by") is None
               else f"{_plain(base['source'])} + {_plain(subj['produced_by'])}")
    if subj.get("format"):
        subject += f" ({_plain(cert_md.format_line(subj['format']).split(' · evaluated')[0])})"
    policy = cert["policy"]
    seq = sequential_view.view(cert)
    final = (f"{seq.evaluated} of {cert['pairing']['final_n']}" if seq is not None
             else cert["pairing"]["final_n"])
    context = (f"{subject} vs baseline {_plain(base['source'])} · {_plain(policy['tier'])} tier "
               f"· {_plain(policy['profile'])} profile · {cert['pairing']['preview_n']} + "
               f"{final} windows")
    parts = [f"### {icon} {name}: {status}", cert_md.summary_sentence(cert), context]
    if status == "FAIL":
        parts.append("\n".join(f"- {_plain(r)}" for r in cert["verdict"]["reasons"]))
    return "\n\n".join(parts)


def footer(report: Report) -> str:
    links = report.links
    parts = []
    if links.head_sha:
        parts.append(f"commit {_code(links.head_sha[:12])}")
    if links.run_url:
        parts.append(f"[workflow run]({links.run_url})")
    if links.check_url:
        parts.append(f"[check run]({links.check_url})")
    if links.artifact_name and report.outcome.certificate is not None:
        artifact = f"certificate artifact {_code(links.artifact_name)}"
        if links.html_report and links.run_url:
            artifact = (f"[HTML report]({links.run_url}#artifacts) ({_code(links.html_report)}"
                        f" in the {artifact})")
        parts.append(artifact)
    cert = report.outcome.certificate
    if cert is not None:
        parts.append(f"run {_code(cert['run_id'])}")
        parts.append(f"digest {_code(str(cert.get('digest', 'unsealed'))[:19] + '…')}")
    return f"<sub>{' · '.join(parts)}</sub>" if parts else ""


def guard_findings(cert: dict[str, Any]) -> str:
    """The certificate's guard tables (one row per guard, per-family numbers, findings)."""
    lines = cert_md.guard_findings(cert, level=4)
    if not lines:
        return "#### Guards\n\nNo guard results in this certificate."
    return "\n".join(lines).rstrip()


def sequential_report(cert: dict[str, Any]) -> str:
    """The certificate's sequential section (looks, why it stopped, design) and, when there
    were several looks, a chart of the bounds narrowing towards the threshold."""
    section = "\n".join(cert_md.sequential_section(cert, level=4)).rstrip()
    chart = bounds_chart(cert)
    return section + ("\n\n" + chart if chart else "")


# ----------------------------------------------------------------------------- fitting


def fit(parts: Sequence[str], tail: str, limit: int, notice: str) -> str:
    """Join `parts` (then `tail`) within `limit` characters, dropping later parts first.

    When something is dropped, `notice` takes its place; a part that alone is too long is cut
    at a line boundary.
    """
    sep = "\n\n"
    full = sep.join([*parts, tail]) if tail else sep.join(parts)
    if len(full) <= limit:
        return full
    reserve = len(notice) + len(sep) + (len(tail) + len(sep) if tail else 0)
    room = limit - reserve
    if room < 0:
        raise ValueError(f"limit {limit} leaves no room for the notice and the footer")
    kept: list[str] = []
    used = 0
    for part in parts:
        extra = len(part) + (len(sep) if kept else 0)
        if used + extra <= room:
            kept.append(part)
            used += extra
            continue
        space = room - used - (len(sep) if kept else 0)
        if space > 0:
            cut = part[:space]
            cut = _close_blocks(cut[: cut.rfind("\n")] if "\n" in cut else "")
            if cut.strip():
                kept.append(cut)
        break
    out = [*kept, notice] + ([tail] if tail else [])
    return sep.join(out)


def _close_blocks(text: str) -> str:
    """A cut inside a ``` block or <details> would swallow what follows; drop the open block."""
    if text.count("```") % 2 == 1:
        text = text[: text.rfind("```")].rstrip()
    if text.count("<details>") > text.count("</details>"):
        text = text[: text.rfind("<details>")].rstrip()
    return text


def _truncation_notice(report: Report) -> str:
    where = (f"[workflow run]({report.links.run_url})" if report.links.run_url
             else "workflow run")
    return (f"_Report truncated to fit GitHub's size limit; the full certificate is attached to "
            f"the {where}._")


# ----------------------------------------------------------------------------- small helpers


def _plain(text: object) -> str:
    """Untrusted text for a table cell or a line (invarlock.untrusted.markdown)."""
    return untrusted.markdown(text)


def _code(text: object) -> str:
    """Untrusted text that names something (a commit, a digest, a file) in code style when
    it is a plain token, else as escaped text (backslash escapes do not work in code)."""
    value = str(text)
    if _TOKEN.fullmatch(value):
        return f"`{value}`"
    return untrusted.markdown(value)


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,79}…?")


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:200] if lines else "no message"
