"""The report folder: the certificate, its Markdown, and what the Action adds for publishing.

A certifying run writes `invarlock-action.json` next to the certificate: the exit code, the
error (if any) and the commit and pull request it certified. A publishing run (fork pull
requests, `mode: publish`) reads the folder back. The certificate is the evidence: it must
match its schema and its content digest before anything is published from it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from invarlock import atomic
from invarlock.certificate import document
from invarlock.enums import Verdict
from invarlock.errors import InputError, TamperedCertificateError
from invarlock.github.event import RecordedTarget
from invarlock.github.outcome import (
    EXIT_EVIDENCE,
    EXIT_FAIL,
    EXIT_PASS,
    KNOWN_EXIT_CODES,
    Outcome,
)

RESULT_FILENAME = "invarlock-action.json"
RESULT_FORMAT = "invarlock.action-result"
HTML_FILENAME = "evaluation.cert.html"
# A downloaded report comes from a run the pull request's author controls: its files are
# checked for size, type and shape before anything reads them.
RESULT_SIZE_LIMIT = 64 * 1024  # bytes; a genuine result file is well under 2 KiB
CERTIFICATE_SIZE_LIMIT = 64 * 1024 * 1024  # bytes; release certificates are a few MiB
RESULT_DEPTH_LIMIT = 4  # result -> target -> files -> path


def checked_certificate(path: Path) -> dict[str, Any]:
    """Load a certificate and check its schema and digest (TamperedCertificateError if not)."""
    _check_regular_file(Path(path), CERTIFICATE_SIZE_LIMIT, "certificate")
    cert = document.load_certificate(path)
    problems = document.schema_errors(cert)
    if problems:
        raise TamperedCertificateError(f"{path}: does not match the certificate schema: "
                                       + "; ".join(problems[:3]))
    if cert.get("digest") != document.content_digest(cert):
        raise TamperedCertificateError(f"{path}: content digest mismatch; the certificate was "
                                       "changed after it was written")
    return cert


def outcome_from_certificate(path: Path) -> Outcome:
    """The outcome a certificate file stands for (its verdict decides the exit code)."""
    cert = checked_certificate(path)
    verdict = Verdict(cert["verdict"]["status"])
    markdown = path.parent / cert["artifacts"]["markdown"]
    return Outcome(EXIT_PASS if verdict is Verdict.PASS else EXIT_FAIL, verdict, cert,
                   path.resolve(), markdown.resolve() if markdown.is_file() else None)


def write_result(out_dir: Path, outcome: Outcome, target: RecordedTarget | None,
                 name: str = "") -> Path:
    data = {
        "format": RESULT_FORMAT,
        "version": 1,
        "name": name,
        "exit_code": outcome.exit_code,
        "verdict": None if outcome.verdict is None else str(outcome.verdict),
        "error": outcome.error,
        "certificate": None if outcome.certificate_path is None
        else outcome.certificate_path.name,
        "target": None if target is None else target.as_dict(),
    }
    return atomic.write_text(Path(out_dir) / RESULT_FILENAME, json.dumps(data, indent=2) + "\n")


def write_html(outcome: Outcome) -> Path | None:
    """The certificate's HTML report next to it (linked from the comment, in the artifact)."""
    if outcome.certificate is None or outcome.certificate_path is None:
        return None
    from invarlock.report import html
    from invarlock.verify import verify_certificate

    page = html.render(outcome.certificate, verify_certificate(outcome.certificate))
    return atomic.write_text(outcome.certificate_path.parent / HTML_FILENAME, page)


def bind_report(outcome: Outcome, recorded: RecordedTarget | None, head_sha: str) -> Outcome:
    """The outcome a downloaded report may be published as, for the commit `head_sha`.

    A verdict stands only when the certificate verifies (schema, digest, every number and the
    verdict recomputed from its own windows and policy) and the report records `head_sha` as
    the commit it certified; otherwise the outcome is an evidence error saying why, which
    concludes the check run `failure`.
    """
    if recorded is None:
        return Outcome.failed(EXIT_EVIDENCE, f"the report does not bind to commit "
                                             f"{head_sha[:12]}: it records no commit (a bare "
                                             f"certificate or no {RESULT_FILENAME})")
    if recorded.head_sha != head_sha:
        return Outcome.failed(EXIT_EVIDENCE, f"the report does not bind to commit "
                                             f"{head_sha[:12]}: it was made for "
                                             f"{recorded.head_sha[:12]}")
    if outcome.certificate is None:
        return outcome
    from invarlock.verify import verify_certificate

    report = verify_certificate(outcome.certificate)
    if not report.verified:
        shown = "; ".join(report.differences[:3])
        more = len(report.differences) - 3
        return Outcome.failed(EXIT_EVIDENCE, "the certificate does not verify: " + shown
                              + (f" (and {more} more)" if more > 0 else ""))
    return outcome


def load_report(path: Path) -> tuple[Outcome, RecordedTarget | None]:
    """Read a downloaded report folder (or a bare certificate file)."""
    path = Path(path)
    if path.is_file():
        return outcome_from_certificate(path), None
    if not path.is_dir():
        raise InputError(f"no report at {path}: give the downloaded artifact folder or the "
                         "certificate file")
    result = _read_result(path / RESULT_FILENAME)
    target = RecordedTarget.from_dict(result.get("target")) if result else None
    cert_path = path / document.CERT_FILENAME
    if cert_path.is_file():
        return outcome_from_certificate(cert_path), target
    if result is None:
        raise InputError(f"{path} holds neither {document.CERT_FILENAME} nor {RESULT_FILENAME}")
    code = result["exit_code"]
    if code in (EXIT_PASS, EXIT_FAIL):
        raise TamperedCertificateError(f"{path / RESULT_FILENAME}: records a verdict but the "
                                       "certificate is missing")
    error = result["error"]
    return Outcome.failed(code, error if error else f"the certifier exited with {code}"), \
        target


def recorded_name(folder: Path) -> str:
    """The subject name a report folder's result file records (empty when none)."""
    try:
        result = _read_result(Path(folder) / RESULT_FILENAME)
    except InputError:
        return ""
    name = (result or {}).get("name")
    return name if isinstance(name, str) else ""


def _read_result(path: Path) -> dict[str, Any] | None:
    """The result file, checked before use: a regular file of bounded size, UTF-8 JSON of
    bounded depth, each field of its type and every exit code one the certifier can give."""
    if not os.path.lexists(path):
        return None
    _check_regular_file(path, RESULT_SIZE_LIMIT)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise TamperedCertificateError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if _json_depth(text) > RESULT_DEPTH_LIMIT:
        raise TamperedCertificateError(f"{path}: JSON nested deeper than {RESULT_DEPTH_LIMIT} "
                                       "levels; an Action result is not")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TamperedCertificateError(f"{path} is not valid JSON (line {exc.lineno}, column "
                                       f"{exc.colno})") from None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise TamperedCertificateError(f"{path} is not an InvarLock Action result")
    problems = [f"'{key}' must be {what}" for key, what, ok in (
        ("name", "a string", isinstance(data.get("name", ""), str)),
        ("exit_code", f"one of {', '.join(map(str, KNOWN_EXIT_CODES))}",
         type(data.get("exit_code")) is int and data["exit_code"] in KNOWN_EXIT_CODES),
        ("verdict", "PASS, FAIL or null", data.get("verdict") in (None, "PASS", "FAIL")),
        ("error", "a string or null", isinstance(data.get("error"), (str, type(None)))),
        ("certificate", "a string or null",
         isinstance(data.get("certificate"), (str, type(None)))),
        ("target", "an object or null", isinstance(data.get("target"), (dict, type(None)))),
    ) if not ok]
    target = data.get("target")
    if isinstance(target, dict):
        files = target.get("files", [])
        if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            problems.append("'target.files' must be a list of strings")
        for key in ("event_name", "head_sha", "run_url"):
            if not isinstance(target.get(key), (str, type(None))):
                problems.append(f"'target.{key}' must be a string")
        number = target.get("pull_request")
        if not (number is None or (type(number) is int and 0 < number < 2**31)):
            problems.append("'target.pull_request' must be a pull request number or null")
    if problems:
        raise TamperedCertificateError(f"{path}: not a valid Action result: "
                                       + "; ".join(problems[:3]))
    return data


def _check_regular_file(path: Path, limit: int, what: str = "file") -> None:
    """A regular file (not a FIFO, device or folder) of at most `limit` bytes."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise TamperedCertificateError(f"{path} is not a regular file")
    if info.st_size > limit:
        raise TamperedCertificateError(f"{path} is {info.st_size} bytes, more than the "
                                       f"{limit} such a file can be")


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON text, outside strings, counted without parsing
    (json.loads recurses and a deep document would exhaust the stack first)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest

