"""Where the bar came from: the reference table every report shows, PASS or FAIL.

A verdict means little without knowing what the subject was judged against. The certificate's
`reference` section records, for the baseline, the dataset, the policy and each preset, where
it was read from (the base branch, a pinned digest, the pull request, local files), its digest
and, when the run compared the pull request with the base checkout, whether the pull request
changed it. The PR comment, the check run (summary and text), the job summary and the matrix
aggregate all render it with this one module, so they cannot disagree.

Pure: certificates in, Markdown out. Everything read from a certificate is untrusted text and
goes through `invarlock.untrusted` (a digest is shown as code only when it is one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from invarlock import untrusted

HEADING = "#### Reference"
_ORIGINS = {"base-checkout": "base branch", "pinned-digest": "pinned digest",
            "pull-request": "pull request", "local": "local files"}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_COLUMNS = ["Item", "Origin", "Digest", "Changed in the pull request"]
_NOT_RECORDED = "The certificate does not record where its baseline, data and policy came from."


def table(cert: dict[str, Any] | None) -> str:
    """The reference section of one report: a heading, the table and, where it matters, one
    line saying what the origin means (empty without a certificate)."""
    if cert is None:
        return ""
    ref = cert.get("reference")
    if not isinstance(ref, dict):
        return f"{HEADING}\n\n{_NOT_RECORDED}"
    lines = [HEADING, "", _row(_COLUMNS), _rule(len(_COLUMNS)),
             *(_row(cells) for cells in _cells(ref))]
    note = _note(ref)
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def aggregate_table(rows: Sequence[tuple[str, dict[str, Any] | None]]) -> str:
    """The reference of a matrix: one table when every subject was judged against the same
    reference (the usual case, one baseline), else one row per subject and item."""
    known = [(name, cert["reference"]) for name, cert in rows
             if cert is not None and isinstance(cert.get("reference"), dict)]
    if not known:
        return "" if not any(cert is not None for _, cert in rows) else \
            f"{HEADING}\n\n{_NOT_RECORDED}"
    tables = {name: _cells(ref) for name, ref in known}
    first = next(iter(tables.values()))
    if len(known) == sum(cert is not None for _, cert in rows) and \
            all(cells == first for cells in tables.values()):
        lines = [f"{HEADING} (every subject)", "", _row(_COLUMNS), _rule(len(_COLUMNS)),
                 *(_row(cells) for cells in first)]
        note = _note(known[0][1])
        return "\n".join(lines) + (f"\n\n{note}" if note else "")
    lines = [HEADING, "", _row(["Subject", *_COLUMNS]), _rule(len(_COLUMNS) + 1)]
    for name, cells_of in tables.items():
        lines += [_row([untrusted.markdown(name, 64), *cells]) for cells in cells_of]
    missing = [name for name, cert in rows if cert is not None and name not in tables]
    if missing:
        lines += ["", "No reference recorded for: "
                  + ", ".join(untrusted.markdown(n, 64) for n in missing) + "."]
    return "\n".join(lines)


def _cells(ref: dict[str, Any]) -> list[list[str]]:
    """One row of cells per item: what, where from, digest, changed."""
    items = [("Baseline", ref.get("baseline")), ("Dataset", ref.get("dataset")),
             ("Policy (thresholds, window sizes)", ref.get("policy"))]
    for preset in ref.get("presets") or ():
        if isinstance(preset, dict):
            path = untrusted.markdown(preset.get("path", ""), 120)
            items.append((f"Preset {path}" if path else "Preset", preset))
    return [[label, *_item(item, ref.get("origin"))] for label, item in items]


def _item(item: Any, run_origin: Any) -> list[str]:
    if not isinstance(item, dict):
        return ["not recorded", "", ""]
    origin = item.get("origin")
    digest = item.get("digest")
    shown = (f"`{digest[:19]}…`" if isinstance(digest, str) and _DIGEST.fullmatch(digest)
             else untrusted.markdown(digest, 80))
    return [_origin(origin), shown, _changed(item.get("changed"), origin, run_origin)]


def _origin(origin: Any) -> str:
    return _ORIGINS.get(origin, untrusted.markdown(origin, 40)) if isinstance(origin, str) \
        else "not recorded"


def _changed(changed: Any, origin: Any, run_origin: Any) -> str:
    if changed is True:
        return "⚠️ **yes** (approved change)"
    if changed is False:
        return "no"
    if origin == "pinned-digest":
        return "no (matches the pin)"
    if run_origin == "pull-request":
        return "not compared"
    return "—"


def _note(ref: dict[str, Any]) -> str:
    origin = ref.get("origin")
    items = [ref.get(k) for k in ("baseline", "dataset", "policy")]
    compared = all(isinstance(i, dict) and "changed" in i for i in items)
    if origin == "pull-request" and not compared:
        return ("⚠️ Read from the pull request under test and not compared with the base "
                "branch: the pull request could have moved the bar with the subject (set "
                "`reference-path`, or pin the digests).")
    if origin == "pull-request" and any(isinstance(i, dict) and i.get("changed") is True
                                        for i in [*items, *(ref.get("presets") or ())]):
        return "The pull request's own files were used: an approved reference change."
    if origin == "local":
        return "Read from the paths as given (not a pull request run)."
    return ""


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(columns: int) -> str:
    return "|" + "---|" * columns
