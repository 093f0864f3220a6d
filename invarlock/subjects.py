"""Several subjects against one baseline in one run: the baseline is evaluated once.

Every subject is resolved and its tokenizer checked before anything is evaluated; then the
baseline's results come from one evaluation (or the cache), the baseline either stays
resident beside each subject (lockstep) or leaves before each subject loads and comes back
in its place for the next block (blocks); either way later windows are scored as a
subject's looks need them, and every later subject reuses them. The subjects are loaded and
certified one at a time through `certify.certify_subject`. Each
gets its own folder ``<out>/<name>/`` with its certificate; the output folder also gets
``index.json`` (sealed: see `invarlock.subject_index`) and ``index.md``, one row per
subject. The run's exit code is the worst of the subjects' (PASS 0 < FAIL 1 < input error 2
< evidence error 3): a subject that cannot be certified is recorded in the index with its
error, and the next one still runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock import atomic, untrusted
from invarlock.certificate import sequential_view
from invarlock.certificate.document import CERT_FILENAME, SET_FILENAMES
from invarlock.errors import InputError, InvarlockError
from invarlock.subject_index import (
    INDEX_FORMAT,
    INDEX_JSON,
    INDEX_MARKDOWN,
    INDEX_VERSION,
    folder_names,
    index_markdown,
    row_windows,
    seal,
)

log = logging.getLogger(__name__)

__all__ = ["INDEX_JSON", "INDEX_MARKDOWN", "SubjectResult", "SubjectsOutcome",
           "certify_subjects", "folder_names", "index_document", "index_markdown",
           "write_index"]


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


def certify_subjects(req: Any, specs: Sequence[str]) -> SubjectsOutcome:
    """Certify each subject in ``specs`` against ``req.baseline``; write the index."""
    from invarlock import certify as pipeline

    if req.edit is not None:
        raise InputError("several subjects are compared with a baseline as checkpoints; "
                         "an edit builds one subject: give either --edit or --subject")
    if len(specs) < 2:
        raise InputError("certify_subjects needs at least two subjects")
    started = time.perf_counter()
    shared = pipeline.Timer()
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
    del base_model  # the baseline's schedule decides whether it stays beside each subject
    pipeline.settle_baseline(inputs, plan, req, baseline)
    try:
        return _each(pipeline, req, specs, inputs, shared, started, checked, names, plan,
                     baseline)
    finally:
        baseline.resident.release()


def _each(pipeline: Any, req: Any, specs: Sequence[str], inputs: Any, shared: Any,
          started: float, checked: list[Any], names: list[str], plan: Any,
          baseline: Any) -> SubjectsOutcome:
    """Certify the subjects one at a time against the shared baseline; write the index."""
    out_dir = inputs.out_dir
    shared_seconds = time.perf_counter() - started

    results = []
    for spec, (subject, origin, tok_hash), name in zip(specs, checked, names, strict=True):
        sub_req = dataclasses.replace(req, subject=spec, out_dir=out_dir / name)
        sub_inputs = dataclasses.replace(inputs, run_id=pipeline.new_run_id(), subject=subject,
                                         subject_tokenizer=origin,
                                         subject_tokenizer_hash=tok_hash,
                                         out_dir=out_dir / name)
        timer = pipeline.Timer(dict(shared.spans))
        try:
            prepared = pipeline.prepare_subject(sub_inputs, sub_req, timer)
            outcome = pipeline.certify_subject(
                sub_inputs, plan, baseline, prepared, sub_req, timer,
                time.perf_counter() - shared_seconds)
        except InvarlockError as exc:
            log.error("subject %s: %s", untrusted.log_line(spec), exc)
            for stale in SET_FILENAMES:  # an older run's certificate must not stand for this one
                (out_dir / name / stale).unlink(missing_ok=True)
            results.append(SubjectResult(name, spec, None, str(exc), exc.exit_code))
            continue
        finally:
            pipeline.release_memory()
        code = 0 if outcome.verdict == "PASS" else 1
        results.append(SubjectResult(name, spec, outcome, None, code))
    index = write_index(out_dir, baseline.record, results)
    return SubjectsOutcome(tuple(results), out_dir, index)


def index_document(baseline: dict[str, Any], results: Sequence[SubjectResult]) -> dict[str, Any]:
    """The index, sealed with its own digest; each row names its certificate's digest."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"name": r.name, "subject": r.spec, "exit_code": r.exit_code,
                               "error": r.error, "verdict": "ERROR", "certificate": None,
                               "digest": None, "ratio": None, "ratio_ci": None, "limit": None,
                               "alpha": None, "final_windows": None, "sequential": None}
        if r.outcome is not None:
            cert = r.outcome.certificate
            pm = cert["primary_metric"]
            row.update(verdict=r.outcome.verdict, certificate=f"{r.name}/{CERT_FILENAME}",
                       digest=cert.get("digest"), ratio=pm.get("ratio"),
                       ratio_ci=pm.get("ratio_ci"), limit=pm.get("limit"),
                       alpha=(pm.get("bootstrap") or {}).get("alpha"),
                       final_windows=row_windows(cert),
                       sequential=getattr(sequential_view.view(cert), "phrase", None))
        rows.append(row)
    return seal({"format": INDEX_FORMAT, "version": INDEX_VERSION,
                 "baseline": {"source": baseline.get("source"),
                              "weights_digest": baseline.get("weights_digest"),
                              "results_from_cache": baseline.get("results_from_cache")},
                 "exit_code": max(r.exit_code for r in results), "subjects": rows})


def write_index(out_dir: Path, baseline: dict[str, Any],
                results: Sequence[SubjectResult]) -> Path:
    """index.md first, index.json last: the JSON never vouches for a table not yet written."""
    doc = index_document(baseline, results)
    atomic.write_text(out_dir / INDEX_MARKDOWN, index_markdown(doc))
    return atomic.write_text(out_dir / INDEX_JSON, json.dumps(doc, indent=2) + "\n")
