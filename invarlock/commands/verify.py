"""`invarlock verify` and `invarlock report`: the auditor's commands, run without torch.

Each body loads only what it needs. Everything printed from a certificate, an index or a
path is made inert for a CI log (`invarlock.untrusted.log_line`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from invarlock.commands.common import (
    EXIT_FAIL,
    EXIT_INPUT,
    EXIT_PASS,
    configure_logging,
    log,
    run_guarded,
)
from invarlock.errors import InputError, InvarlockError, TamperedCertificateError

_VERIFY_EPILOG = """\b
Without models, for each certificate: the JSON schema; the content digest; the policy digest
and that every policy value differing from the tier/profile defaults is a declared override;
pairing (match 1.00, overlap 0.00 recomputed from the window hashes, equal counts); the
primary metric, its BCa interval (recorded seed and replicates), every validation flag and
the verdict, recomputed with the functions certify uses (tolerance 1e-12 relative); each
guard section through its guard's re-check.
\b
--baseline-cert REF: also confirm each certificate was judged against the same baseline
evidence as REF: identical baseline weights digest, tokenizer, dataset, window plan and
baseline per-window results.
\b
A folder written by a run with several --subject holds index.json, sealed by its digest: it
is held to the folder (every certificate at <name>/evaluation.cert.json inside it, no symbolic
link, every subject folder listed, exit code the worst row's, at least one subject), each
certificate it lists is verified and must match its row (verdict, digest, subject, numbers,
baseline), and index.md must be exactly the table index.json renders to.
A folder holding both an index and a single-subject certificate is rejected.
\b
Exit codes: 0 every certificate verifies and says PASS; 1 they verify and one says FAIL (or
a listed subject has no certificate); 2 a certificate or index is tampered with, malformed or
unreadable, or its baseline evidence differs.
\b
Examples:
  invarlock verify runs/int8/evaluation.cert.json
  invarlock verify runs/int8 runs/int4 --baseline-cert runs/int8 --json
"""


@click.command(epilog=_VERIFY_EPILOG)
@click.argument("certificates", nargs=-1, required=True, metavar="CERT...")
@click.option("--baseline-cert", metavar="CERT",
              help="Reference certificate whose baseline evidence each CERT must share.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify(certificates: tuple[str, ...], baseline_cert: str | None, as_json: bool) -> None:
    """Re-check certificates without models: digest, numbers, flags, verdict."""
    configure_logging(quiet=True)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock import verify as verifying
        from invarlock.certificate.document import load_certificate

        reference = None
        if baseline_cert is not None:
            reference = load_certificate(baseline_cert)
            ref_report = verifying.verify_certificate(reference)
            if not ref_report.verified:
                raise TamperedCertificateError(
                    f"the reference certificate {baseline_cert} does not verify: "
                    f"{ref_report.differences[0]}")
        results: list[dict[str, Any]] = []
        for path in certificates:
            results += _verify_one(path, reference)
        code = _verify_exit_code(results)
        if not as_json:
            click.echo(_verify_text(results))
        return code, {"format_version": 1, "exit_code": code,
                      "tolerance": {"relative": verifying.REL_TOL,
                                    "absolute": verifying.ABS_TOL},
                      "baseline_cert": baseline_cert, "certificates": results}

    run_guarded(as_json, body)


def _verify_one(path: str, reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The results for one argument: a certificate, a run folder, or a folder with an index."""
    from invarlock import subject_index

    folder = Path(path)
    if folder.name == subject_index.INDEX_JSON and folder.is_file():
        folder = folder.parent  # the index is checked with the folder it describes
    kind = subject_index.folder_kind(folder) if folder.is_dir() else None
    if kind == "mixed":
        return [_unverified(path, [
            f"holds both {subject_index.INDEX_JSON} (a run with several subjects) and a "
            "single-subject certificate set: results of two runs are mixed; certify again into "
            "an empty folder"])]
    if kind != "index":
        return [_verify_certificate(path, reference)]
    checked = subject_index.check_folder(folder)
    results = []
    if checked.problems:
        results.append(_unverified(str(checked.path), list(checked.problems)))
    for row, cert_path in checked.certificates:
        results.append(_verify_certificate(str(cert_path), reference, row, checked.index))
    for row in checked.errors:
        results.append({"path": f"{path}: {row.get('subject')}", "verified": True,
                        "verdict": "ERROR", "differences": [],
                        "notes": [f"no certificate: {row.get('error')}"], "checked": [],
                        "exit_code": row.get("exit_code")})
    return results


def _verify_certificate(path: str, reference: dict[str, Any] | None,
                        row: dict[str, Any] | None = None,
                        index: dict[str, Any] | None = None) -> dict[str, Any]:
    from invarlock import subject_index
    from invarlock import verify as verifying
    from invarlock.certificate.document import load_certificate

    try:
        cert = load_certificate(path)
    except InvarlockError as exc:
        return {**_unverified(path, [str(exc)]), "exit_code": exc.exit_code}
    result = {"path": path, **verifying.verify_certificate(cert, reference).as_dict()}
    if row is not None and index is not None:  # the index row must describe this certificate
        listed = subject_index.row_differences(row, cert, index)
        if listed:
            result.update(verified=False, differences=[*result["differences"], *listed],
                          exit_code=EXIT_INPUT)
    return result


def _unverified(path: str, differences: list[str]) -> dict[str, Any]:
    return {"path": path, "verified": False, "verdict": None, "differences": differences,
            "notes": [], "checked": [], "exit_code": EXIT_INPUT}


def _verify_exit_code(results: list[dict[str, Any]]) -> int:
    if not results or any(not r["verified"] for r in results):
        return EXIT_INPUT  # nothing checked is never a pass
    return EXIT_FAIL if any(r["verdict"] != "PASS" for r in results) else EXIT_PASS


def _verify_text(results: list[dict[str, Any]]) -> str:
    """One line per certificate and per difference or note; every piece that comes from a
    certificate, an index or a path is made inert for a CI log (`untrusted.log_line`)."""
    from invarlock.untrusted import log_line

    lines = []
    for r in results:
        path = log_line(r["path"], limit=None)
        if r["verified"]:
            lines.append(f"{path}: verified, verdict {log_line(r['verdict'])} "
                         f"({log_line(', '.join(r['checked']), limit=None)})")
        else:
            lines.append(f"{path}: NOT VERIFIED ({len(r['differences'])} "
                         f"difference(s))")
            lines += [f"  - {log_line(d, limit=_SHOWN_LINE)}" for d in r["differences"]]
        lines += [f"  note: {log_line(n, limit=_SHOWN_LINE)}" for n in r["notes"]]
    return "\n".join(lines)


_SHOWN_LINE = 1000  # characters of one difference or note: enough for any the checks write


_REPORT_EPILOG = """\b
Every rendering says whether the certificate verifies (see `invarlock verify`); a page made
from an edited certificate carries the differences at the top. Without --format the format
follows the -o suffix (.html, .json, else Markdown).
\b
Exit codes: 0 rendered; 2 unreadable or malformed certificate, or unwritable output.
\b
Examples:
  invarlock report runs/int8/evaluation.cert.json
  invarlock report runs/int8 --format html -o int8.html
  invarlock report runs/int8 --format json | jq .primary_metric
"""


@click.command(epilog=_REPORT_EPILOG)
@click.argument("certificate", metavar="CERT")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]),
              help="md (default), html (one self-contained page) or json (a summary).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of stdout.")
def report(certificate: str, fmt: str | None, output: Path | None) -> None:
    """Render a certificate for people: Markdown, a self-contained HTML page, or JSON."""
    configure_logging(quiet=False)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock import atomic
        from invarlock import report as reporting
        from invarlock.certificate.document import load_certificate
        from invarlock.subject_index import folder_kind
        from invarlock.untrusted import log_line
        from invarlock.verify import verify_certificate

        chosen = fmt or _format_from_suffix(output)
        if Path(certificate).is_dir() and folder_kind(Path(certificate)) == "index":
            raise InputError(f"{log_line(certificate, limit=None)} holds the index of a run with "
                             "several subjects; report one subject's folder inside it")
        cert = load_certificate(certificate)
        verification = verify_certificate(cert)
        text = reporting.render(cert, chosen, verification)
        if not verification.verified:
            log.warning("%s does not verify (%d difference(s)); the report says so at the top",
                        log_line(certificate, limit=None), len(verification.differences))
        if output is None:
            click.echo(text, nl=False)
        else:
            try:
                atomic.write_text(output, text)
            except OSError as exc:
                raise InputError(f"cannot write {output}: {exc.strerror or exc}") from None
            log.info("wrote %s", log_line(output, limit=None))
        return EXIT_PASS, None

    run_guarded(False, body)


def _format_from_suffix(output: Path | None) -> str:
    suffix = output.suffix.lower() if output is not None else ""
    return {".html": "html", ".htm": "html", ".json": "json"}.get(suffix, "md")
