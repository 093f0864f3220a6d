"""Certificates rendered for people: Markdown, a self-contained HTML page, or a JSON summary.

Every rendering states whether the certificate verifies (`invarlock.verify`), so a page made
from an edited certificate says so at the top.

`invarlock report` prints these to stdout, which in CI is a log the runner reads for
workflow commands (a line starting `::`, or `##[` anywhere). Strings from the certificate are
escaped for each format (Markdown, HTML, JSON), and no rendering holds a line the runner
would take for a command: the JSON writes `:` and `#` there as `\\u` escapes, the HTML as
character references, which read back as the same text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from invarlock import untrusted
from invarlock.certificate import markdown as md
from invarlock.certificate.document import schema_errors, strict_json
from invarlock.errors import TamperedCertificateError
from invarlock.report import html
from invarlock.verify import ABS_TOL, REL_TOL, VerifyReport, verify_certificate

FORMATS = ("md", "html", "json")
HTML_FILENAME = "evaluation.report.html"
SUMMARY_FORMAT_VERSION = 1

__all__ = ["FORMATS", "HTML_FILENAME", "render", "summary"]


def render(cert: Mapping[str, Any], fmt: str,
           verification: VerifyReport | None = None) -> str:
    """`cert` as `fmt` (md, html or json); verified here unless a report is passed in."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; use one of {', '.join(FORMATS)}")
    problems = schema_errors(dict(cert))
    if problems:
        raise TamperedCertificateError(f"cannot render a malformed certificate: {problems[0]}"
                                       + (f" (and {len(problems) - 1} more)"
                                          if len(problems) > 1 else ""))
    report = verification if verification is not None else verify_certificate(cert)
    if fmt == "html":
        return inert_html(html.render(cert, report))
    if fmt == "json":
        return strict_json(summary(cert, report), indent=2, ensure_ascii=False) + "\n"
    return md.render(dict(cert)) + "\n" + _markdown_verification(report)


_LINE = 1000  # characters of one difference or note shown


def _markdown_verification(report: VerifyReport) -> str:
    """Differences and notes quote the certificate: each is escaped for Markdown."""
    lines = ["## Verification", ""]
    if report.verified:
        lines.append(f"Verified: {untrusted.markdown(', '.join(report.checked), _LINE)} "
                     f"recomputed from the stored numbers (tolerance {REL_TOL:g} relative, "
                     f"{ABS_TOL:g} absolute).")
        lines += [f"- note: {untrusted.markdown(n, _LINE)}" for n in report.notes]
    else:
        lines.append(f"**This certificate does not verify** ({len(report.differences)} "
                     "difference(s)); do not rely on it.")
        lines += ["", *[f"- {untrusted.markdown(d, _LINE)}" for d in report.differences]]
    return "\n".join(lines) + "\n"


# A line break as a log reader splits lines (\n, \r), then the spaces it trims, then `::`.
_COMMAND_START = re.compile(r"(\A|[\r\n])([^\S\r\n]*):(?=:)")


def inert_html(page: str) -> str:
    """`page` with no line a CI runner reads as a workflow command: `##[` anywhere and `::`
    at a line's start get a character reference, which a browser shows as the same text.
    (Certificate text in a page is escaped for HTML, which keeps its line breaks.)"""
    page = page.replace("##[", "#&#35;[")
    return _COMMAND_START.sub(lambda m: f"{m.group(1)}{m.group(2)}&#58;", page)


def summary(cert: Mapping[str, Any], report: VerifyReport) -> dict[str, Any]:
    """A compact machine-readable view: verdict, the one number, gates, guards, verification."""
    pm = cert["primary_metric"]
    gating = set(cert["gating"])
    explanations = cert["verdict"].get("explanations", {})
    return {
        "format_version": SUMMARY_FORMAT_VERSION,
        "verdict": cert["verdict"]["status"],
        "reasons": list(cert["verdict"]["reasons"]),
        "primary_metric": {
            "kind": pm["kind"], "ratio": pm["ratio"], "ratio_ci": pm["ratio_ci"],
            "delta": pm["delta"], "limit": pm["limit"], "basis": pm["basis"],
            "gate_value": pm["gate_value"], "drift": pm["drift"],
            "catastrophic": pm["catastrophic"],
        },
        "gates": [{"flag": flag, "passed": bool(ok), "gating": flag in gating,
                   "reason": explanations.get(flag, "")}
                  for flag, ok in cert["validation"].items()],
        "guards": {name: {"mode": s.get("mode"), "passed": s.get("passed"),
                          "reason": s.get("reason")}
                   for name, s in (cert.get("guards") or {}).items()},
        "policy": {"tier": cert["policy"]["tier"], "profile": cert["policy"]["profile"],
                   "digest": cert["policy"]["digest"],
                   "overrides": list(cert["policy"]["overrides"])},
        "baseline": cert["baseline"]["source"],
        "subject": cert["subject"]["source"],
        "run_id": cert["run_id"],
        "digest": cert.get("digest"),
        "verification": report.as_dict(),
    }
