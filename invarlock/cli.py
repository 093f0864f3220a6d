"""Command line: certify, run, verify, report, doctor, plugins, version.

The CLI is the only place (with the Action entrypoint) that turns exceptions into exit codes:
0 PASS, 1 FAIL, 2 bad input or configuration, 3 evidence cannot be produced. Errors are one
line on stderr; with `--json` stdout carries exactly one JSON object whatever happens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from invarlock import __version__
from invarlock.errors import (
    InputError,
    InvarlockError,
    MissingExtraError,
    TamperedCertificateError,
)

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_EVIDENCE = 0, 1, 2, 3

log = logging.getLogger("invarlock")


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("invarlock: %(levelname)s: %(message)s"))
    root = logging.getLogger("invarlock")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    # transformers imports an installed torchao while loading any checkpoint, and torchao
    # announces each optional kernel it cannot load here (other GPU generations): not news
    # for a certification, and a kernel a checkpoint really needs fails its load anyway.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _require_hf(feature: str) -> None:
    """Model commands need torch and transformers; say which extra installs them."""
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(feature, "hf")


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Keep stdout for the one JSON object: anything a library prints goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _run_guarded(as_json: bool, body: Callable[[], tuple[int, dict[str, Any] | None]]) -> None:
    """Run a command body; translate errors into one line and the right exit code.

    The body returns its exit code and, for `--json`, the object to print once stdout is
    stdout again.
    """
    try:
        with _stdout_to_stderr(as_json):
            code, payload = body()
    except InvarlockError as exc:
        _fail(as_json, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail(as_json, "interrupted", 130)
    except Exception as exc:  # a defect, not bad input: still one line, unless debugging
        if os.environ.get("INVARLOCK_DEBUG"):
            raise
        _fail(as_json, f"internal error: {type(exc).__name__}: {exc} "
                       "(set INVARLOCK_DEBUG=1 for the traceback)", EXIT_EVIDENCE)
    if as_json and payload is not None:
        click.echo(strict_json(payload))
    sys.exit(code)


def strict_json(payload: Any) -> str:
    """JSON that every parser accepts: NaN and infinities (not JSON) become null."""
    from invarlock.certificate.document import strict_json as dumps

    return dumps(payload)


def _fail(as_json: bool, message: str, code: int) -> None:
    from invarlock.untrusted import log_line  # a message may quote a certificate or a path

    click.echo(f"invarlock: error: {log_line(message, limit=None)}", err=True)
    if as_json:
        click.echo(_error_json(message, code))
    sys.exit(code)


def _error_json(message: str, code: int) -> str:
    """The one JSON object `--json` prints when there is no verdict to report."""
    return strict_json({"verdict": "ERROR", "exit_code": code, "error": message})


class _Commands(click.Group):
    """With `--json` anywhere on the command line, a usage error (unknown flag, bad value,
    missing argument) is reported like any other error: one line on stderr and exactly one
    JSON object on stdout, instead of click's usage block."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            _fail(True, exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail(True, "aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Commands,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="invarlock")
def main() -> None:
    """InvarLock: certify that an edited checkpoint is still as good as its baseline.

    \b
    Examples:
      invarlock certify                       # bundled demo: INT8 edit of a small model
      invarlock certify --baseline models/base --subject models/int8 --dataset data.txt
      invarlock certify --baseline models/base --edit quant_rtn --edit-config int4.yaml \\
          --dataset hf:wikitext:wikitext-2-raw-v1:validation --profile release --json
      invarlock run -c run.yaml                 # the same, from a config file
      invarlock doctor -c run.yaml              # preflight: would that run work?
      invarlock verify runs/int8                # re-check a certificate without models
      invarlock report runs/int8 -o int8.html   # render it for people

    \b
    Environment: INVARLOCK_ALLOW_NETWORK=1 allows downloads; INVARLOCK_CACHE_DIR holds the
    baseline cache; INVARLOCK_DEBUG=1 shows tracebacks. Reference: docs/cli.md.
    """


@main.command(epilog="""\b
Examples:
  invarlock version
  invarlock -V          # the version only
""")
def version() -> None:
    """Print the version of invarlock and of the libraries it uses."""
    from invarlock.environment import library_versions

    click.echo(f"invarlock {__version__}")
    for name, ver in library_versions().items():
        click.echo(f"  {name} {ver or 'not installed'}")


_CERTIFY_EPILOG = """\b
Exit codes: 0 PASS, 1 FAIL, 2 bad input or configuration, 3 evidence cannot be produced.
\b
Examples:
  invarlock certify
  invarlock certify --baseline ./base --subject ./int8 --dataset ./eval.txt --profile ci
  invarlock certify --baseline ./base --edit quant_rtn --edit-config rtn4.yaml \\
      --dataset demo --tier conservative --out reports/rtn4 --json
"""


@main.command(epilog=_CERTIFY_EPILOG)
@click.option("--baseline", metavar="MODEL",
              help="Baseline: local directory, hub id (hf:ID), or 'demo' (default).")
@click.option("--subject", metavar="MODEL", multiple=True,
              help="Subject checkpoint to compare; repeat it to certify several against one "
                   "baseline evaluation (one folder each, plus index.json / index.md).")
@click.option("--edit", "edit_name", metavar="NAME",
              help="Build the subject in memory with an edit (quant_rtn, or an edit plugin).")
@click.option("--edit-config", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML with `edit: {name: quant_rtn, plan: {...}}`.")
@click.option("--dataset", "dataset_spec", metavar="SPEC",
              help="Evaluation text: a .txt file, a folder of .txt, a .jsonl file, 'demo', "
                   "'wikitext2', or hf:NAME[:CONFIG[:SPLIT]].")
@click.option("--text-field", help="JSONL/HF field holding the text (default: text).")
@click.option("--label-field", help="JSONL/HF field holding classifier labels (default: label).")
@click.option("--profile", type=click.Choice(["dev", "ci", "release"]),
              help="Evidence size (default: ci).")
@click.option("--tier", type=click.Choice(["balanced", "conservative", "aggressive"]),
              help="Acceptance thresholds (default: balanced).")
@click.option("--preset", "presets", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Config file(s) merged in order (seed shape); flags win.")
@click.option("--adapter", help="auto (default), hf_causal, hf_mlm, hf_seq_cls, or a plugin.")
@click.option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps.")
@click.option("--device-map",
              type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
              help="Spread each model over the GPUs (accelerate), CPU and disk offload last.")
@click.option("--max-memory", metavar="DEV=SIZE,...",
              help="Memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--batch-size", type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for windows and bootstrap.")
@click.option("--allow-pickle", is_flag=True, default=None,
              help="Allow .bin/.pt checkpoints (loaded with weights_only).")
@click.option("--allow-underpowered", is_flag=True, default=None,
              help="Run below the ci/release evidence floor or with settings weaker than "
                   "the tier's and profile's (alpha, calibration windows, limits, guard "
                   "modes); the certificate records evidence_meets_profile: false and lists "
                   "them (a gating flag in release, which then cannot PASS).")
@click.option("--sequential/--no-sequential", default=None,
              help="Stop the final set as soon as a look decides (default: on in dev and ci, "
                   "off in release).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the certificate (default: runs/<run id>).")
@click.option("--save-subject", type=click.Path(file_okay=False, path_type=Path),
              help="With --edit: write the edited checkpoint here, only when PASS.")
@click.option("--save-format", type=click.Choice(["safetensors", "gguf"]),
              help="Format of --save-subject: safetensors (default) or gguf (Q8_0 for 8 bits, "
                   "Q4_0 for 4; the certified weights are the stored ones).")
@click.option("--gguf-file", metavar="NAME",
              help="The GGUF file to use in a model folder that holds several.")
@click.option("--dequantize", is_flag=True, default=None,
              help="Evaluate a quantized model's dequantized float weights where its backend "
                   "has no kernels for the device (recorded in the certificate).")
@click.option("--runtime", type=click.Choice(["auto", "llama.cpp", "transformers"]),
              help="What evaluates a GGUF model: llama.cpp's own kernels, as served (the "
                   "default when the 'llamacpp' extra is installed), or transformers' "
                   "dequantized float forward.")
@click.option("--write-ve-subject", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a copy of the subject with the VE guard's proposed scales "
                   "folded into its weights (the subject itself is never changed).")
@click.option("--no-cache", is_flag=True, help="Always re-evaluate the baseline.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Baseline cache folder (default: $INVARLOCK_CACHE_DIR or ~/.cache).")
@click.option("--cache-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="INVARLOCK_CACHE_SECRET_FILE", show_envvar=True,
              help="Secret that signs baseline cache entries (HMAC-SHA256); entries without "
                   "a valid signature are ignored and re-evaluated.")
@click.option("--cache-namespace", type=click.Choice(["trusted", "untrusted"]),
              help="Trust level of this run: its own cache folder and key (a fork's run is "
                   "untrusted; a trusted run never reads untrusted entries).")
@click.option("--baseline-digest", metavar="sha256:HEX",
              help="Pin the baseline: stop (exit 2) before evaluating when its weights "
                   "digest differs.")
@click.option("--policy-digest", metavar="sha256:HEX",
              help="Pin the resolved policy: stop (exit 2) before evaluating when its digest "
                   "differs.")
@click.option("--dataset-digest", metavar="sha256:HEX",
              help="Pin the evaluation data: stop (exit 2) before evaluating when the corpus "
                   "digest differs.")
@click.option("--reference-origin", type=click.Choice(["local", "base-checkout",
                                                       "pull-request"]),
              help="Where the baseline, dataset and presets were read from (recorded in the "
                   "certificate; default: local).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def certify(as_json: bool, quiet: bool, **flags: Any) -> None:
    """Compare a subject with its baseline on paired windows and write a certificate.

    With no --baseline, the bundled demo model, tokenizer and corpus are used, and with no
    --subject the demo applies quant_rtn (INT8): `invarlock certify` alone is a real run.
    """
    _configure_logging(quiet)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.run_config import config_from_certify_flags, request_from_config

        _require_hf("invarlock certify")
        trust = {k: flags.pop(k) for k in _TRUST_FLAGS}
        config = config_from_certify_flags(flags)
        progress = not quiet and sys.stderr.isatty()
        request = _with_trust(request_from_config(config, progress=progress), trust,
                              flags.get("presets") or ())
        return _certify_and_report(request, as_json)

    _run_guarded(as_json, body)


_TRUST_FLAGS = ("cache_secret_file", "cache_namespace", "baseline_digest", "policy_digest",
                "dataset_digest", "reference_origin")


def _with_trust(request: Any, trust: dict[str, Any], presets: tuple[Path, ...]) -> Any:
    """The request with the cache secret and namespace, and the reference's origin and pins
    (a bad secret file or digest stops here, before anything is loaded)."""
    import dataclasses

    from invarlock.cache import Namespace, read_secret
    from invarlock.provenance import Origin, Reference, parse_digest

    secret = read_secret(trust["cache_secret_file"]) if trust["cache_secret_file"] else None
    namespace = Namespace(trust["cache_namespace"]) if trust["cache_namespace"] else None
    reference = Reference(
        origin=Origin(trust["reference_origin"] or "local"),
        baseline_digest=(parse_digest(trust["baseline_digest"], "--baseline-digest")
                         if trust["baseline_digest"] else None),
        policy_digest=(parse_digest(trust["policy_digest"], "--policy-digest")
                       if trust["policy_digest"] else None),
        dataset_digest=(parse_digest(trust["dataset_digest"], "--dataset-digest")
                        if trust["dataset_digest"] else None),
        presets=tuple(Path(p) for p in presets))
    return dataclasses.replace(request, cache_secret=secret, cache_namespace=namespace,
                               reference=reference)


def _certify_and_report(request: Any, as_json: bool) -> tuple[int, dict[str, Any] | None]:
    from invarlock.certify import certify as run_certify

    if len(request.subjects) > 1:
        return _certify_many(request, as_json)
    outcome = run_certify(request)
    summary = outcome.summary()
    if not as_json:
        click.echo(_human_summary(summary))
    return (EXIT_PASS if outcome.verdict == "PASS" else EXIT_FAIL), summary


def _certify_many(request: Any, as_json: bool) -> tuple[int, dict[str, Any] | None]:
    """Repeated --subject: one baseline evaluation, a certificate per subject, an index."""
    from invarlock.subjects import certify_subjects

    run = certify_subjects(request, request.subjects)
    rows = []
    for r in run.results:
        if r.outcome is None:
            rows.append({"subject": r.spec, "verdict": "ERROR", "exit_code": r.exit_code,
                         "error": r.error})
            continue
        summary = r.outcome.summary()
        rows.append({"subject": r.spec, "exit_code": r.exit_code, **summary})
    if not as_json:
        for row in rows:
            if row["verdict"] == "ERROR":
                click.echo(f"{row['subject']}: ERROR: {row['error']}")
            else:
                click.echo(f"{row['subject']}: " + _human_summary(row))
        click.echo(f"index: {run.index_path}")
    return run.exit_code, {"verdict": "PASS" if run.exit_code == 0 else "FAIL",
                           "exit_code": run.exit_code, "index": str(run.index_path),
                           "subjects": rows}


def _level(alpha: float) -> str:
    """The interval's confidence level as recorded (1 − α), e.g. '95%'."""
    return f"{100 * (1 - alpha):g}%"


def _human_summary(s: dict[str, Any]) -> str:
    """The verdict and the one number, saying exactly what was and was not measured."""
    if s["ratio_ci"] is not None:
        lo, hi = s["ratio_ci"]
        number = (f"ratio {s['ratio']:.4f}, {_level(s['alpha'])} CI [{lo:.4f}, {hi:.4f}], "
                  f"limit {s['limit']:.2f}")
    elif s["delta_ci"] is not None:
        lo, hi = s["delta_ci"]
        number = (f"accuracy change {_level(s['alpha'])} CI [{lo:+.2f}, {hi:+.2f}] pp, "
                  f"limit {s['limit']:+.2f} pp")
    elif s.get("stopped"):
        number = f"stopped: {s['stopped']}, final set not evaluated"
    elif s["catastrophic"]:
        number = "catastrophic preview, final set not evaluated"
    else:
        number = "final set not evaluated"
    if s.get("sequential"):
        number += f"; {s['sequential']}"
    lines = [f"{s['verdict']}: {number}"]
    if s["verdict"] == "FAIL":
        lines += [f"  - {r}" for r in s["reasons"]]
    if s.get("guards"):
        lines.append("guards: " + ", ".join(
            f"{name} {_guard_word(g)}{' (monitor)' if g['mode'] == 'monitor' else ''}"
            for name, g in s["guards"].items()))
    lines.append(f"certificate: {s['certificate']}")
    return "\n".join(lines)


def _guard_word(g: dict[str, Any]) -> str:
    if not g.get("measured", True):
        return "not measured"
    return "ok" if g["passed"] else "FAILED"


# ============================================================================================
# Auditing and operator commands: verify, report, doctor, plugins, run.
# Each body loads only what it needs: verify, report and plugins run without torch.
# ============================================================================================

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
certificate it lists is verified and must match its row (verdict, digest, subject, baseline).
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


@main.command(epilog=_VERIFY_EPILOG)
@click.argument("certificates", nargs=-1, required=True, metavar="CERT...")
@click.option("--baseline-cert", metavar="CERT",
              help="Reference certificate whose baseline evidence each CERT must share.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify(certificates: tuple[str, ...], baseline_cert: str | None, as_json: bool) -> None:
    """Re-check certificates without models: digest, numbers, flags, verdict."""
    _configure_logging(quiet=True)

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

    _run_guarded(as_json, body)


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


@main.command(epilog=_REPORT_EPILOG)
@click.argument("certificate", metavar="CERT")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]),
              help="md (default), html (one self-contained page) or json (a summary).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of stdout.")
def report(certificate: str, fmt: str | None, output: Path | None) -> None:
    """Render a certificate for people: Markdown, a self-contained HTML page, or JSON."""
    _configure_logging(quiet=False)

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

    _run_guarded(False, body)


def _format_from_suffix(output: Path | None) -> str:
    suffix = output.suffix.lower() if output is not None else ""
    return {".html": "html", ".htm": "html", ".json": "json"}.get(suffix, "md")


_PLUGINS_EPILOG = """\b
Distributions add components through the entry-point groups invarlock.adapters,
invarlock.edits and invarlock.guards; see docs/cli.md for what each must provide.
\b
Examples:
  invarlock plugins
  invarlock plugins adapters
  invarlock plugins guards --json
"""


@main.command(epilog=_PLUGINS_EPILOG)
@click.argument("kind", required=False, type=click.Choice(["adapters", "edits", "guards"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def plugins(kind: str | None, as_json: bool) -> None:
    """List adapters, edits and guards: built-in and from installed plugins."""
    _configure_logging(quiet=True)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock import catalog as registry

        found = registry.components(kind)
        if not as_json:
            click.echo(_plugins_text(found, (kind,) if kind else registry.KINDS))
        return EXIT_PASS, {"format_version": 1,
                           "components": [c.as_dict() for c in found]}

    _run_guarded(as_json, body)


def _plugins_text(found: list[Any], kinds: tuple[str, ...]) -> str:
    lines = []
    for kind in kinds:
        lines.append(f"{kind}:")
        rows = [c for c in found if c.kind == kind]
        if not rows:
            lines.append("  (none)")
        width = max((len(c.name) for c in rows), default=0)
        for c in rows:
            origin = f"{c.origin} {c.version or ''}".strip()
            extra = f" (aliases: {', '.join(c.aliases)})" if c.aliases else ""
            if c.origin != "builtin":
                extra += f" [{c.target}]"
            if c.error:
                extra += f" UNUSABLE: {c.error}"
            lines.append(f"  {c.name:<{width}}  {origin:<24}  {c.summary}{extra}")
    return "\n".join(lines)


_DOCTOR_EPILOG = """\b
Preflight without evaluating: config keys and types, tier and profile, models as metadata
(config.json, safetensors headers), architecture and shapes, tokenizers, enough unique
windows for the profile, device, free memory, network policy. Findings print as
SEVERITY [INVARLOCK:Dnnn] message; the codes are listed in docs/cli.md.
\b
Exit codes: 0 no ERROR finding; 2 at least one ERROR.
\b
Examples:
  invarlock doctor --config run.yaml
  invarlock doctor --baseline ./base --subject ./int8 --dataset eval.txt --profile ci --json
"""


@main.command(epilog=_DOCTOR_EPILOG)
@click.option("-c", "--config", "configs", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Run config file(s) in the seed shape, merged in order.")
@click.option("--baseline", metavar="MODEL", help="Baseline checkpoint (overrides model.id).")
@click.option("--subject", metavar="MODEL", help="Subject checkpoint (overrides model.subject).")
@click.option("--dataset", "dataset_spec", metavar="SPEC", help="Dataset spec, as for certify.")
@click.option("--edit", "edit_name", metavar="NAME", help="Edit to build the subject with.")
@click.option("--profile", type=click.Choice(["dev", "ci", "release"]))
@click.option("--tier", type=click.Choice(["balanced", "conservative", "aggressive"]))
@click.option("--adapter", help="auto (default), hf_causal, hf_mlm, hf_seq_cls, or a plugin.")
@click.option("--device", help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--allow-pickle", is_flag=True, default=None, help="Accept .bin/.pt weights.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def doctor(configs: tuple[Path, ...], as_json: bool, **flags: Any) -> None:
    """Check a run before spending compute on it: config, models, data, device."""
    _configure_logging(quiet=True)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.doctor import diagnose

        result = diagnose(configs=configs, flags=flags)
        if not as_json:
            click.echo(result.text())
        return result.exit_code, result.as_dict()

    _run_guarded(as_json, body)


_RUN_EPILOG = """\b
The config files (the seed's shape: model, dataset, edit, eval, guards, auto, output) merge
in order, later files win; then the run is exactly `certify` with that configuration.
output.dir: the certificate folder (default runs/<run id>); output.save_report (default
true): also write the HTML report there; output.save_model: with an edit, save the edited
subject to <output.dir>/model, only on PASS.
\b
Exit codes: 0 PASS, 1 FAIL, 2 bad input or configuration, 3 evidence cannot be produced.
\b
Examples:
  invarlock run -c run.yaml
  invarlock run -c configs/base.yaml -c configs/int4.yaml --json
"""


@main.command(epilog=_RUN_EPILOG)
@click.option("-c", "--config", "configs", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Run config file; repeat to layer overrides (later wins).")
@click.option("--cache-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="INVARLOCK_CACHE_SECRET_FILE", show_envvar=True,
              help="Secret that signs baseline cache entries (as for certify).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def run(configs: tuple[Path, ...], cache_secret_file: Path | None, as_json: bool,
        quiet: bool) -> None:
    """Certify as a config file describes it (the same pipeline as certify)."""
    _configure_logging(quiet)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.run_config import config_from_files, request_from_config

        _require_hf("invarlock run")
        config = config_from_files(configs)
        progress = not quiet and sys.stderr.isatty()
        trust = {**dict.fromkeys(_TRUST_FLAGS), "cache_secret_file": cache_secret_file}
        request = _with_trust(request_from_config(config, progress=progress), trust, ())
        return _certify_and_report(request, as_json)

    _run_guarded(as_json, body)


# --- invarlock calibrate ---------------------------------------------------------------------

_CALIBRATE_EPILOG = """\b
Writes OUT/calibration.yaml (a preset: certify --preset OUT/calibration.yaml), and the
statistics it came from in OUT/calibration.json and OUT/calibration.csv; the reference
certificates stay in OUT/runs/.
\b
Examples:
  invarlock calibrate --out calib/demo
  invarlock calibrate --baseline ./base --dataset ./eval.txt --profile dev --seeds 3 \\
      --out calib/base
"""


@main.command(epilog=_CALIBRATE_EPILOG)
@click.option("--baseline", metavar="MODEL",
              help="Baseline: local directory, hub id (hf:ID), or 'demo' (default).")
@click.option("--dataset", "dataset_spec", metavar="SPEC",
              help="Evaluation text (as for certify); the demo corpus for the demo model.")
@click.option("--profile", type=click.Choice(["dev", "ci", "release"]), default="dev",
              show_default=True, help="Evidence size of each reference run.")
@click.option("--tier", type=click.Choice(["balanced", "conservative", "aggressive"]),
              help="Tier whose budget, quantile rule and sidedness are used (default: balanced).")
@click.option("--preset", "presets", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Config file(s) merged in order (seed shape); flags win.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Seeds of each seeded reference edit (noise, zoo families).")
@click.option("--edits", type=click.Choice([
    "rtn8", "noise", "zoo", "rtn8_channel", "rtn8_group", "fp16", "bf16", "prune",
    "normfold_one", "normfold_some", "normfold_all", "lowrank", "rtn4_group", "qk_scale",
    "awq_scale", "awq_rtn4"]), multiple=True,
              help="Reference edits (default: rtn8 and noise); zoo: every benign zoo family, "
                   "seeds 0..N-1 each.")
@click.option("--margin", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Added to each κ.")
@click.option("--quantile", type=click.FloatRange(0.5, 1.0), default=0.95, show_default=True,
              help="Quantile of null RMT deltas for ε.")
@click.option("--epsilon-floor", type=click.FloatRange(min=0), default=0.01,
              show_default=True, help="Added to each ε.")
@click.option("--half-width", type=click.FloatRange(min=0, min_open=True), default=0.001,
              show_default=True, help="Target CI half-width (nats/token) for window sizing.")
@click.option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--batch-size", type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for windows and bootstrap.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Folder for the preset, statistics and certificates.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Baseline cache folder (default: OUT/cache).")
@click.option("--resume", is_flag=True,
              help="Reuse reference certificates already in OUT/runs/ (same baseline, edit).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def calibrate(as_json: bool, quiet: bool, **flags: Any) -> None:
    """Calibrate guard thresholds on benign reference edits of a baseline.

    Certifies INT8 RTN and INT8-step noise (one per seed) against the baseline with the
    guards in monitor mode, then sets spectral κ per family (order statistic of |z| with the
    WARN budget split by family size), RMT ε per family (quantile of the null deltas), the
    VE minimum effect and a window count for the target CI half-width.
    """
    _configure_logging(quiet)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.calibration.runner import EDITS, CalibrationRequest, run
        from invarlock.run_config import config_from_certify_flags, request_from_config

        _require_hf("invarlock calibrate")
        certify_flags = {k: flags.get(k) for k in (
            "baseline", "dataset_spec", "profile", "tier", "presets", "device", "dtype",
            "batch_size", "seed", "cache_dir")}
        certify_flags["edit_name"] = "quant_rtn"
        config = config_from_certify_flags(certify_flags)
        request = CalibrationRequest(
            base=request_from_config(config, report=False), out_dir=flags["out_dir"],
            seeds=flags["seeds"],
            edits=tuple(flags["edits"]) or EDITS, margin=flags["margin"],
            quantile=flags["quantile"], epsilon_floor=flags["epsilon_floor"],
            half_width=flags["half_width"], resume=flags["resume"])
        outcome = run(request)
        if not as_json:
            click.echo(f"calibrated on {len(outcome.calibration.rows)} reference runs")
            click.echo(f"preset: {outcome.yaml_path}")
            click.echo(f"statistics: {outcome.json_path}, {outcome.csv_path}")
        return EXIT_PASS, outcome.summary()

    _run_guarded(as_json, body)
