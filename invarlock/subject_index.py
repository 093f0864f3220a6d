"""The index of a run with several subjects: written sealed, checked against its folder.

``<out>/index.json`` lists one row per subject: its folder ``<out>/<name>/``, its verdict and
exit code, and the digest of the certificate in that folder (or the error that stopped it).
The index carries its own content digest over those rows, as a certificate does.

A digest proves integrity against accidents, not authorship: anyone can edit a row and
recompute it. So `check_folder` trusts nothing the index says that the folder can confirm:
every row's certificate lies at ``<name>/evaluation.cert.json`` inside the folder (no ``..``,
no absolute path, no symbolic link anywhere on the way), every subject folder in it is
listed, the index's exit code is the worst of its rows', and at least one subject is listed.
`row_differences` then holds each certificate to its row (digest, verdict, subject, numbers,
baseline), and `markdown_problems` holds ``index.md`` to the table index.json renders to.
What it cannot catch is a subject removed together with its folder: the index then
describes a smaller run, truthfully.

An output folder holds the result of one run: a single-subject certificate set or an index
with its subject folders, never both. `refuse_mixed_results` keeps a run from writing one
beside the other (exit 2, before anything is evaluated), and `folder_kind` makes `verify`
refuse a folder that holds both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from invarlock import untrusted
from invarlock.certificate import sequential_view
from invarlock.certificate.document import (
    CERT_FILENAME,
    MAX_DEPTH,
    SET_FILENAMES,
    content_digest,
    nesting_depth,
)
from invarlock.errors import InputError
from invarlock.outdir import shown

INDEX_JSON = "index.json"
INDEX_MARKDOWN = "index.md"
INDEX_FORMAT = "invarlock.index"
INDEX_VERSION = 3  # 3: rows carry final_windows and sequential; 2: sealed; 1: no digest
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")  # what `folder_names` produces
_VERDICT_CODE = {"PASS": 0, "FAIL": 1}
_ERROR_CODES = (2, 3)
_MAX_INDEX_BYTES = 16 * 2**20  # far beyond any real index; larger input is refused unread


def folder_names(specs: Sequence[str]) -> list[str]:
    """A distinct, filesystem-safe folder name per subject, from the last part of its spec.

    Names of the files a result folder holds (index.json, evaluation.cert.json, ...) are
    taken by those files, so a subject with such a name gets a numbered one."""
    taken = {n.lower() for n in (INDEX_JSON, INDEX_MARKDOWN, *SET_FILENAMES)}
    names: list[str] = []
    for spec in specs:
        tail = re.split(r"[/\\:]", spec.rstrip("/\\"))[-1] or "subject"
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip(".-")[:190] or "subject"
        name, n = base, 2
        # compared without case: on a case-insensitive file system INDEX.md is index.md
        while name.lower() in {m.lower() for m in names} or name.lower() in taken:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def index_markdown(doc: dict[str, Any]) -> str:
    """The index as a Markdown table; every string from a row is escaped for Markdown.

    `verify` re-renders it from index.json and compares it with index.md, so what this
    writes for a given index is part of the index format: a change to it bumps
    INDEX_VERSION."""
    lines = [f"# InvarLock: {len(doc['subjects'])} subjects against "
             f"{untrusted.markdown(doc['baseline']['source'])}", "",
             "| subject | verdict | ratio | CI (recorded level) | limit | final windows "
             "(sequential test) | certificate |",
             "|---|---|---|---|---|---:|---|"]
    for row in doc["subjects"]:
        ratio = f"{row['ratio']:.4f}" if isinstance(row["ratio"], float) else "–"
        level = (f"{100 * (1 - row['alpha']):g}% " if isinstance(row.get("alpha"), float)
                 else "")
        ci = (f"{level}[{row['ratio_ci'][0]:.4f}, {row['ratio_ci'][1]:.4f}]"
              if row["ratio_ci"] else "–")
        limit = f"{row['limit']:.2f}" if isinstance(row["limit"], (int, float)) else "–"
        # a link's target is the folder name, which `folder_names` keeps to [A-Za-z0-9._-]
        where = (f"[{untrusted.markdown(row['certificate'])}]({row['name']}/{CERT_FILENAME})"
                 if row["certificate"] else untrusted.markdown(row["error"] or "–"))
        lines.append(f"| {untrusted.markdown(row['subject'])} | {row['verdict']} | {ratio} | "
                     f"{ci} | {limit} | {_windows_cell(row)} | {where} |")
    return "\n".join(lines) + "\n"


def _windows_cell(row: dict[str, Any]) -> str:
    """Where the sequential test stopped ("decided after 32 of 200 windows (PASS)"), else
    the final windows evaluated of planned ("200/200"); "–" when the row says neither."""
    if isinstance(row.get("sequential"), str):
        return untrusted.markdown(row["sequential"])
    counts = row.get("final_windows")
    if not isinstance(counts, dict) or not all(
            isinstance(counts.get(k), int) and not isinstance(counts.get(k), bool)
            for k in ("evaluated", "planned")):
        return "–"
    return f"{counts['evaluated']}/{counts['planned']}"


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """The index with its content digest (sha256 over every other field)."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return {**body, "digest": content_digest(body)}


# --- what an output folder holds ------------------------------------------------------------

def folder_kind(folder: Path) -> str | None:
    """'index', 'certificate', 'mixed' (both: two runs' results), or None (neither)."""
    folder = Path(folder)
    has_index = any(_exists(folder / name) for name in (INDEX_JSON, INDEX_MARKDOWN))
    has_cert = any(_exists(folder / name) for name in SET_FILENAMES)
    if has_index and has_cert:
        return "mixed"
    return "index" if has_index else "certificate" if has_cert else None


def subject_folders(folder: Path) -> list[str]:
    """Entries of `folder` that hold (or stand for) a subject's result: every folder with a
    certificate file in it, and every symbolic link."""
    found = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.is_symlink() or (entry.is_dir() and any(
                _exists(entry / name) for name in SET_FILENAMES)):
            found.append(entry.name)
    return found


def refuse_mixed_results(out_dir: Path, specs: Sequence[str]) -> None:
    """Refuse (exit 2) a run whose result would sit beside an older result of another shape.

    A run with one subject must not write into a folder holding an index; a run with several
    must not write into one holding a single-subject certificate, nor beside subject folders
    its own index would not list. Refusing, rather than deleting the older result, never
    destroys evidence on the strength of a run that may still fail; same-shaped results
    are replaced as before (set by set, the index last)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    hint = "choose another --out or remove the older result first"
    if len(specs) <= 1:
        found = [name for name in (INDEX_JSON, INDEX_MARKDOWN) if _exists(out_dir / name)]
        if found:
            raise InputError(f"output folder {shown(out_dir)} holds {found[0]} of an earlier "
                             "run with several subjects; a single-subject certificate would "
                             f"sit beside it: {hint}")
        return
    found = [name for name in SET_FILENAMES if _exists(out_dir / name)]
    if found:
        raise InputError(f"output folder {shown(out_dir)} holds {found[0]} of an earlier "
                         "single-subject run; an index of several subjects would sit beside "
                         f"it: {hint}")
    names = set(folder_names(specs))
    stale = [name for name in subject_folders(out_dir) if name not in names]
    if stale:
        raise InputError(f"output folder {shown(out_dir)} holds '{stale[0]}', a subject folder "
                         f"of an earlier run that this run's index would not list: {hint}")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


# --- checking an index against its folder ---------------------------------------------------

@dataclass(frozen=True)
class IndexCheck:
    """What `check_folder` found: the index, its problems, and the rows to verify."""

    path: Path  # the index file
    index: dict[str, Any] | None  # None when it could not be read as an index at all
    problems: tuple[str, ...]  # one line each; empty when the index agrees with the folder
    certificates: tuple[tuple[dict[str, Any], Path], ...]  # (row, its certificate file)
    errors: tuple[dict[str, Any], ...]  # rows of subjects that could not be certified


def read_index(path: Path) -> dict[str, Any]:
    """The index document at `path`, or one clear error when it is not one."""
    try:
        if not path.is_file():
            raise InputError(f"{shown(path)} is not a file")
        if path.stat().st_size > _MAX_INDEX_BYTES:
            raise InputError(f"{shown(path)} is larger than any index ({_MAX_INDEX_BYTES} "
                             "bytes)")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise InputError(f"{shown(path)}: JSON nested too deeply to be an index") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {shown(path)}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{shown(path)} is not valid JSON (line {exc.lineno}, column "
                         f"{exc.colno})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise InputError(f"{shown(path)} is not an InvarLock index")
    if nesting_depth(doc) > MAX_DEPTH:
        raise InputError(f"{shown(path)}: JSON nested deeper than {MAX_DEPTH} levels")
    return doc


def check_folder(folder: Path) -> IndexCheck:
    """The index of `folder` held to the folder itself (see the module docstring)."""
    folder = Path(folder)
    path = folder / INDEX_JSON
    try:
        doc = read_index(path)
    except InputError as exc:
        return IndexCheck(path, None, (str(exc),), (), ())
    problems = _seal_problems(doc)
    rows = doc.get("subjects")
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        return IndexCheck(path, doc, (*problems, "subjects: must be a list of rows"), (), ())
    if not rows:
        problems.append("subjects: empty; an index lists at least one subject, and verify "
                        "checks at least one certificate")
    certificates: list[tuple[dict[str, Any], Path]] = []
    errors: list[dict[str, Any]] = []
    names: list[str] = []
    for i, row in enumerate(rows):
        row = dict(row)
        where = f"subjects[{i}]"
        name = row.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(f"{where}.name: {name!r} is not a subject folder name")
            continue
        if name in names:
            problems.append(f"{where}.name: {name!r} is listed twice")
            continue
        names.append(name)
        where = f"{where} ({name})"
        if row.get("verdict") == "ERROR":
            found = _error_row_problems(folder, row, where)
            problems += found
            if not found:
                errors.append(row)
            continue
        problems += _verdict_problems(row, where)
        placed = _certificate_problems(folder, row, where)
        problems += placed
        if not placed:  # only a certificate in its place is read at all
            certificates.append((row, folder / name / CERT_FILENAME))
    problems += _exit_code_problems(doc, rows)
    unlisted = [n for n in _listing(folder) if n not in names]
    problems += [f"folder '{n}' holds a result but is not listed in {INDEX_JSON}"
                 for n in unlisted]
    problems += markdown_problems(folder, doc)
    return IndexCheck(path, doc, tuple(problems), tuple(certificates), tuple(errors))


def markdown_problems(folder: Path, doc: Mapping[str, Any]) -> list[str]:
    """index.md must be exactly the table `index_markdown` renders from index.json.

    Re-rendering, rather than a digest of index.md stored in the index, holds the table to
    what the index says (and the index to its certificates): a digest authenticates nothing,
    since whoever edits the table can recompute it and re-seal the index."""
    path = Path(folder) / INDEX_MARKDOWN
    if path.is_symlink():
        return [f"{INDEX_MARKDOWN} is a symbolic link; the table lies inside the output folder"]
    if not path.is_file():
        return [f"{INDEX_MARKDOWN} is missing; a run writes it beside {INDEX_JSON}"]
    try:
        if path.stat().st_size > _MAX_INDEX_BYTES:
            return [f"{INDEX_MARKDOWN} is larger than any index table ({_MAX_INDEX_BYTES} "
                    "bytes)"]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"cannot read {INDEX_MARKDOWN}: {exc}"]
    try:
        expected = index_markdown(dict(doc))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        return [f"{INDEX_JSON} cannot be rendered as a table to compare {INDEX_MARKDOWN} with "
                f"({type(exc).__name__}: {exc})"]
    if text == expected:
        return []
    got, want = text.splitlines(), expected.splitlines()
    line = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)))
    return [f"{INDEX_MARKDOWN} differs from the table {INDEX_JSON} renders to, from line "
            f"{line + 1} (edited after the run wrote it)"]


def _listing(folder: Path) -> list[str]:
    try:
        return subject_folders(folder)
    except OSError:
        return []


def _seal_problems(doc: dict[str, Any]) -> list[str]:
    if doc.get("version") != INDEX_VERSION:
        return [f"version {doc.get('version')!r}: only a version {INDEX_VERSION} index "
                "(sealed, with every row's windows) is read; certify again to write one"]
    try:
        actual = seal(doc)["digest"]
    except (TypeError, ValueError) as exc:  # NaN, Infinity: not canonical JSON
        return [f"digest: content is not canonical JSON ({exc})"]
    if doc.get("digest") != actual:
        return [f"digest: index says {doc.get('digest')!r}, its content hashes to {actual} "
                "(edited after it was sealed)"]
    return []


def _error_row_problems(folder: Path, row: dict[str, Any], where: str) -> list[str]:
    """A subject that could not be certified: an error, its exit code, and no certificate."""
    name, code = row["name"], row.get("exit_code")
    problems = []
    if row.get("certificate") is not None or row.get("digest") is not None:
        problems.append(f"{where}: an ERROR row names no certificate")
    if isinstance(code, bool) or code not in _ERROR_CODES:
        problems.append(f"{where}.exit_code: {code!r}, but a subject that could not be "
                        f"certified exits {' or '.join(map(str, _ERROR_CODES))}")
    if not isinstance(row.get("error"), str) or not row["error"]:
        problems.append(f"{where}.error: an ERROR row says what stopped the subject")
    if any(_exists(folder / name / f) for f in SET_FILENAMES):
        problems.append(f"{where}: folder '{name}' holds a certificate, but the row says the "
                        "subject could not be certified")
    return problems


def _verdict_problems(row: dict[str, Any], where: str) -> list[str]:
    verdict, code = row.get("verdict"), row.get("exit_code")
    if not isinstance(verdict, str) or verdict not in _VERDICT_CODE:
        return [f"{where}.verdict: {verdict!r} is not PASS, FAIL or ERROR"]
    if isinstance(code, bool) or code != _VERDICT_CODE[verdict]:
        return [f"{where}.exit_code: {code!r}, but a verified {verdict} exits "
                f"{_VERDICT_CODE[verdict]}"]
    return []


def _certificate_problems(folder: Path, row: dict[str, Any], where: str) -> list[str]:
    """The row names its own certificate, which lies inside the folder, in place."""
    name, listed = row["name"], row.get("certificate")
    expected = f"{name}/{CERT_FILENAME}"
    if listed != expected:
        text = str(listed).replace("\\", "/")
        if isinstance(listed, str) and (PurePosixPath(text).is_absolute()
                                        or Path(listed).is_absolute()
                                        or ".." in PurePosixPath(text).parts):
            return [f"{where}.certificate: {listed!r} leads outside the output folder; a row's "
                    f"certificate is {expected}"]
        return [f"{where}.certificate: {listed!r} is not this row's certificate ({expected})"]
    return _placement_problems(folder, name, where)


def _placement_problems(folder: Path, name: str, where: str) -> list[str]:
    """The certificate is a plain file in a plain folder directly inside `folder`."""
    sub, cert = folder / name, folder / name / CERT_FILENAME
    if sub.is_symlink():
        return [f"{where}: folder '{name}' is a symbolic link; a subject folder lies inside the "
                "output folder"]
    if cert.is_symlink():
        return [f"{where}: {name}/{CERT_FILENAME} is a symbolic link; a certificate lies inside "
                "the output folder"]
    if not cert.is_file():
        return [f"{where}: {name}/{CERT_FILENAME} is missing"]
    try:
        inside = cert.resolve(strict=True).parent.parent == folder.resolve(strict=True)
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        return [f"{where}: {name}/{CERT_FILENAME} does not lie inside the output folder"]
    return []


def _exit_code_problems(doc: dict[str, Any], rows: list[Any]) -> list[str]:
    codes = [r.get("exit_code") for r in rows]
    if not codes or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        return []  # reported per row, or the index is empty
    worst, stored = max(codes), doc.get("exit_code")
    if stored != worst or isinstance(stored, bool):
        return [f"exit_code: index says {stored!r}, its rows give {worst} (the worst of "
                "PASS 0, FAIL 1, input error 2, evidence error 3)"]
    return []


def row_windows(cert: Mapping[str, Any]) -> dict[str, int] | None:
    """A row's `final_windows`: final windows evaluated of planned (a sequential run stops
    at the look that decided)."""
    counts = sequential_view.final_windows(cert)
    return None if counts is None else {"evaluated": counts[0], "planned": counts[1]}


def row_differences(row: Mapping[str, Any], cert: Mapping[str, Any],
                    index: Mapping[str, Any]) -> list[str]:
    """Where a listed certificate and its row (and the index's baseline) disagree: every
    value the row or index.md shows must be the certificate's own."""
    verdict = cert.get("verdict")
    subject, baseline = cert.get("subject"), cert.get("baseline")
    base_row = index.get("baseline") if isinstance(index.get("baseline"), Mapping) else {}
    pm = cert.get("primary_metric") if isinstance(cert.get("primary_metric"), Mapping) else {}
    boot = pm.get("bootstrap") if isinstance(pm.get("bootstrap"), Mapping) else {}
    pairs = (
        ("verdict", row.get("verdict"),
         verdict.get("status") if isinstance(verdict, Mapping) else None),
        ("ratio", row.get("ratio"), pm.get("ratio")),
        ("ratio_ci", row.get("ratio_ci"), pm.get("ratio_ci")),
        ("limit", row.get("limit"), pm.get("limit")),
        ("alpha", row.get("alpha"), boot.get("alpha")),
        ("baseline.source", base_row.get("source"),
         baseline.get("source") if isinstance(baseline, Mapping) else None),
        ("digest", row.get("digest"), cert.get("digest")),
        ("subject", row.get("subject"),
         subject.get("source") if isinstance(subject, Mapping) else None),
        ("baseline.weights_digest", base_row.get("weights_digest"),
         baseline.get("weights_digest") if isinstance(baseline, Mapping) else None),
    )
    if "final_windows" in row:  # absent from indexes written before it was recorded
        pairs += (("final_windows", row["final_windows"], row_windows(cert)),
                  ("sequential", row.get("sequential"),
                   getattr(sequential_view.view(cert), "phrase", None)))
    return [f"{INDEX_JSON}: {field} {listed!r} but the certificate says {actual!r}"
            for field, listed, actual in pairs if listed != actual]
