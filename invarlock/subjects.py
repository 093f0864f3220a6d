"""Several subjects against one baseline in one run: the baseline is evaluated once.

Every subject is resolved and its tokenizer checked before anything is evaluated; then the
baseline's results come from one evaluation (or the cache), the baseline model leaves, and
the subjects are loaded and certified one at a time through `certify.certify_subject`. Each
gets its own folder ``<out>/<name>/`` with its certificate; the output folder also gets
``index.json`` and ``index.md``, one row per subject. The run's exit code is the worst of
the subjects' (PASS 0 < FAIL 1 < input error 2 < evidence error 3): a subject that cannot be
certified is recorded in the index with its error, and the next one still runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock import atomic
from invarlock.certificate.document import CERT_FILENAME
from invarlock.errors import InputError, InvarlockError, TamperedCertificateError

log = logging.getLogger(__name__)

INDEX_JSON = "index.json"
INDEX_MARKDOWN = "index.md"
INDEX_FORMAT = "invarlock.index"


@dataclass(frozen=True)
class SubjectResult:
    """One subject's outcome in a multi-subject run."""

    name: str  # its folder inside the output folder
    spec: str  # the --subject value
    outcome: Any  # invarlock.certify.CertifyOutcome, None when it failed with an error
    error: str | None
    exit_code: int


@dataclass(frozen=True)
class SubjectsOutcome:
    results: tuple[SubjectResult, ...]
    out_dir: Path
    index_path: Path

    @property
    def exit_code(self) -> int:
        return max(r.exit_code for r in self.results)


def folder_names(specs: Sequence[str]) -> list[str]:
    """A distinct, filesystem-safe folder name per subject, from the last part of its spec."""
    names: list[str] = []
    for spec in specs:
        tail = re.split(r"[/\\:]", spec.rstrip("/\\"))[-1] or "subject"
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip(".-") or "subject"
        name, n = base, 2
        while name in names or name.lower() in (INDEX_JSON, INDEX_MARKDOWN):  # OUT's own
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def certify_subjects(req: Any, specs: Sequence[str]) -> SubjectsOutcome:
    """Certify each subject in ``specs`` against ``req.baseline``; write the index."""
    from invarlock import certify as pipeline

    if req.edit is not None:
        raise InputError("several subjects are compared with a baseline as checkpoints; "
                         "an edit builds one subject: give either --edit or --subject")
    if len(specs) < 2:
        raise InputError("certify_subjects needs at least two subjects")
    started = time.perf_counter()
    shared = pipeline._Timer()
    inputs = pipeline.validate_inputs(dataclasses.replace(req, subject=specs[0]), shared)
    try:
        return _run(pipeline, req, specs, inputs, shared, started)
    finally:
        inputs.output.release()


def _run(pipeline: Any, req: Any, specs: Sequence[str], inputs: Any, shared: Any,
         started: float) -> SubjectsOutcome:
    checked = [(inputs.subject, inputs.subject_tokenizer, inputs.subject_tokenizer_hash)]
    for spec in specs[1:]:  # every subject checked before anything is evaluated
        subject = pipeline.check_subject(spec, inputs.baseline, req)
        origin, tok_hash = pipeline.check_subject_tokenizer(subject, inputs.tokenizer,
                                                            inputs.tokenizer_hash)
        checked.append((subject, origin, tok_hash))
    out_dir = inputs.out_dir
    names = folder_names(specs)
    for name in names:
        target = out_dir / name
        if target.exists() and not target.is_dir():
            raise InputError(f"cannot write a certificate folder at '{target}': a file is there")
    plan = pipeline.plan_evaluation(inputs, req, shared)
    baseline, base_model = pipeline.evaluate_baseline(inputs, plan, req, shared)
    if base_model is not None:  # None: its results came from the cache
        del base_model  # one model resident at a time: the baseline leaves first
        pipeline._release_memory()
    shared_seconds = time.perf_counter() - started

    results = []
    for spec, (subject, origin, tok_hash), name in zip(specs, checked, names, strict=True):
        sub_req = dataclasses.replace(req, subject=spec, out_dir=out_dir / name)
        sub_inputs = dataclasses.replace(inputs, run_id=pipeline._run_id(), subject=subject,
                                         subject_tokenizer=origin,
                                         subject_tokenizer_hash=tok_hash,
                                         out_dir=out_dir / name)
        timer = pipeline._Timer(dict(shared.spans))
        try:
            prepared = pipeline.prepare_subject(sub_inputs, sub_req, timer)
            outcome = pipeline.certify_subject(
                sub_inputs, plan, baseline, prepared, sub_req, timer,
                time.perf_counter() - shared_seconds)
        except InvarlockError as exc:
            log.error("subject %s: %s", spec, exc)
            results.append(SubjectResult(name, spec, None, str(exc), exc.exit_code))
            continue
        finally:
            pipeline._release_memory()
        code = 0 if outcome.verdict == "PASS" else 1
        results.append(SubjectResult(name, spec, outcome, None, code))
    index = write_index(out_dir, baseline.record, results)
    return SubjectsOutcome(tuple(results), out_dir, index)


def index_document(baseline: dict[str, Any], results: Sequence[SubjectResult]) -> dict[str, Any]:
    rows = []
    for r in results:
        row: dict[str, Any] = {"name": r.name, "subject": r.spec, "exit_code": r.exit_code,
                               "error": r.error, "verdict": "ERROR", "certificate": None,
                               "digest": None, "ratio": None, "ratio_ci": None, "limit": None}
        if r.outcome is not None:
            cert = r.outcome.certificate
            pm = cert["primary_metric"]
            row.update(verdict=r.outcome.verdict, certificate=f"{r.name}/{CERT_FILENAME}",
                       digest=cert.get("digest"), ratio=pm.get("ratio"),
                       ratio_ci=pm.get("ratio_ci"), limit=pm.get("limit"))
        rows.append(row)
    return {"format": INDEX_FORMAT, "version": 1,
            "baseline": {"source": baseline.get("source"),
                         "weights_digest": baseline.get("weights_digest"),
                         "results_from_cache": baseline.get("results_from_cache")},
            "exit_code": max(r.exit_code for r in results), "subjects": rows}


def index_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# InvarLock: {len(doc['subjects'])} subjects against "
             f"`{doc['baseline']['source']}`", "",
             "| subject | verdict | ratio | 95% CI | limit | certificate |",
             "|---|---|---|---|---|---|"]
    for row in doc["subjects"]:
        ratio = f"{row['ratio']:.4f}" if isinstance(row["ratio"], float) else "–"
        ci = (f"[{row['ratio_ci'][0]:.4f}, {row['ratio_ci'][1]:.4f}]"
              if row["ratio_ci"] else "–")
        limit = f"{row['limit']:.2f}" if isinstance(row["limit"], (int, float)) else "–"
        where = f"[{row['certificate']}]({row['certificate']})" if row["certificate"] else (
            row["error"] or "–").replace("|", "\\|")
        lines.append(f"| `{row['subject']}` | {row['verdict']} | {ratio} | {ci} | {limit} | "
                     f"{where} |")
    return "\n".join(lines) + "\n"


def write_index(out_dir: Path, baseline: dict[str, Any],
                results: Sequence[SubjectResult]) -> Path:
    doc = index_document(baseline, results)
    atomic.write_text(out_dir / INDEX_MARKDOWN, index_markdown(doc))
    return atomic.write_text(out_dir / INDEX_JSON, json.dumps(doc, indent=2) + "\n")


def read_index(folder: Path) -> dict[str, Any] | None:
    """The index of a multi-subject output folder, or None when ``folder`` is not one."""
    path = Path(folder) / INDEX_JSON
    if not Path(folder).is_dir() or not path.is_file() or (Path(folder) / CERT_FILENAME).exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TamperedCertificateError(f"{path} is not a readable index: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or not isinstance(
            doc.get("subjects"), list):
        raise TamperedCertificateError(f"{path} is not an InvarLock index")
    for number, row in enumerate(doc["subjects"], start=1):
        if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("name", "subject")) or not isinstance(
                row.get("certificate", ""), (str, type(None))):
            raise TamperedCertificateError(f"{path}: row {number} of subjects is not an index "
                                           "row (name, subject and certificate as text)")
    return doc
