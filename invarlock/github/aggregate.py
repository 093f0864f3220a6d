"""One pull request comment for a matrix of subjects: a row per subject.

The matrix jobs certify one subject each (each with its own check run and artifact, named by
the input `name`) and write no comment; a last job that `needs:` the matrix downloads every
report folder and writes this comment once, so parallel jobs never race on one comment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock import untrusted
from invarlock.certificate import sequential_view
from invarlock.errors import InputError, InvarlockError
from invarlock.github import origin
from invarlock.github.artifact import RESULT_FILENAME, load_report, recorded_name
from invarlock.github.charts import confidence_level
from invarlock.github.outcome import EXIT_EVIDENCE, EXIT_FAIL, EXIT_PASS, Outcome

_ICONS = {"PASS": "✅", "FAIL": "❌"}


@dataclass(frozen=True)
class Row:
    name: str
    outcome: Outcome


def load_rows(folder: Path, expected: tuple[str, ...] = ()) -> list[Row]:
    """Every report folder directly inside `folder` (as actions/download-artifact leaves
    them), sorted by subject name; a folder that cannot be read is a row saying why.

    `expected` names the subjects the matrix was meant to certify: one that left no report
    (its job never ran, was cancelled or failed to upload) is a failing row, and a report for
    a subject not expected is a failing row too, so nothing vanishes from "n of n pass".
    """
    folder = Path(folder)
    if not folder.is_dir():
        if expected:
            return [_missing(name) for name in expected]
        raise InputError(f"no folder {folder}: give the folder the matrix's artifacts were "
                         "downloaded into")
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        if not any(os.path.lexists(sub / n) for n in (RESULT_FILENAME, "evaluation.cert.json")):
            continue
        try:
            outcome, _ = load_report(sub)
        except InvarlockError as exc:
            outcome = Outcome.failed(exc.exit_code, str(exc))
        rows.append(Row(recorded_name(sub) or sub.name, outcome))
    if expected:
        seen = {r.name for r in rows}
        rows = [r if r.name in expected else Row(r.name, Outcome.failed(
                    EXIT_EVIDENCE, "a report for a subject the matrix does not list"))
                for r in rows]
        rows += [_missing(name) for name in expected if name not in seen]
    if not rows:
        raise InputError(f"{folder} holds no InvarLock report folders")
    return sorted(rows, key=lambda r: r.name)


def _missing(name: str) -> Row:
    return Row(name, Outcome.failed(EXIT_EVIDENCE, "no report: the subject's job did not "
                                                   "upload one (not run, cancelled or failed)"))


def exit_code(rows: list[Row]) -> int:
    """0 when every subject passed, 1 when some failed, else the first error's code."""
    codes = [r.outcome.exit_code for r in rows]
    errors = [c for c in codes if c not in (EXIT_PASS, EXIT_FAIL)]
    if errors:
        return errors[0]
    return EXIT_FAIL if EXIT_FAIL in codes else EXIT_PASS


def render_comment(check_name: str, rows: list[Row], *, run_url: str | None) -> str:
    """The aggregate comment body (without the marker line)."""
    passed = sum(1 for r in rows if r.outcome.exit_code == EXIT_PASS)
    levels = sorted({confidence_level(r.outcome.certificate) for r in rows
                     if r.outcome.certificate is not None})
    ci = f"{levels[0]} CI" if len(levels) == 1 else "CI"
    lines = [f"### {untrusted.markdown(check_name)}: {passed} of {len(rows)} subjects pass", "",
             f"| Subject | Verdict | Ratio | {ci} | Limit | Windows |",
             "|---|---|---|---|---|---:|"]
    for row in rows:
        lines.append(_row(row, per_row_level=len(levels) > 1))
    lines += ["", "Windows: final windows evaluated of the planned maximum (a sequential run "
                  "stops at the first look that decides)."]
    reference = origin.aggregate_table([(r.name, r.outcome.certificate) for r in rows])
    if reference:
        lines += ["", reference]
    if run_url:
        lines += ["", f"<sub>[workflow run]({run_url}) · each subject's certificate is an "
                      "artifact of this run</sub>"]
    return "\n".join(lines) + "\n"


def _row(row: Row, *, per_row_level: bool = False) -> str:
    outcome = row.outcome
    name = untrusted.markdown(row.name, 64)
    if outcome.verdict is None or outcome.primary_metric is None:
        error = untrusted.markdown((outcome.error or "no verdict").strip(), 120)
        return f"| {name} | ⚠️ no verdict (exit {outcome.exit_code}): {error} | | | | |"
    pm = outcome.primary_metric
    level = f" ({confidence_level(outcome.certificate)})" if per_row_level else ""
    verdict = f"{_ICONS[str(outcome.verdict)]} {outcome.verdict}"
    windows = windows_cell(outcome.certificate)  # two integers: nothing to escape
    if pm["gate_value"] is None:
        return f"| {name} | {verdict} (catastrophic preview) | | | {pm['limit']} | {windows} |"
    if pm["basis"] == "ratio_ci_upper":
        lo, hi = pm["ratio_ci"]
        return (f"| {name} | {verdict} | {pm['ratio']:.4f} | [{lo:.4f}, {hi:.4f}]{level} | "
                f"≤ {pm['limit']:.2f} | {windows} |")
    lo, hi = pm["delta"]["ci"]
    return (f"| {name} | {verdict} | {pm['delta']['estimate']:+.2f} pp | [{lo:+.2f}, {hi:+.2f}]"
            f" pp{level} | ≥ {pm['limit']:+.2f} pp | {windows} |")


def windows_cell(cert: dict[str, Any] | None) -> str:
    """Final windows evaluated of the planned maximum ("32/200"); empty when unknown."""
    counts = sequential_view.final_windows(cert or {})
    return "" if counts is None else f"{counts[0]}/{counts[1]}"
