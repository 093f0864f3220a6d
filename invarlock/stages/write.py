"""Stage 7: the checkpoints asked for (the VE-corrected copy, the edited subject on PASS),
then the certificate assembled, sealed, rendered and written as a set."""

from __future__ import annotations

import logging
from typing import Any

from invarlock import outdir, provenance, sequential_run
from invarlock.certificate import build, document, markdown
from invarlock.errors import EvidenceError
from invarlock.stages.records import (
    SAVED_MODEL_DIR,
    BaselineEvidence,
    CertifyOutcome,
    CertifyRequest,
    EvaluationPlan,
    Judgement,
    PreparedSubject,
    RunInputs,
    SubjectEvidence,
    Timer,
)

log = logging.getLogger(__name__)


def write_models(inputs: RunInputs, req: CertifyRequest, subject: PreparedSubject,
                 evidence: SubjectEvidence, judgement: Judgement) -> dict[str, str | None]:
    """Checkpoints the user asked for: the VE-corrected copy, the edited subject on PASS."""
    from invarlock.models import loading

    ve_written = None
    if req.write_ve_subject is not None:
        if evidence.ve_scales is None:
            log.warning("no VE-corrected subject written: the variance guard did not run")
        else:
            from invarlock.guards.measure.variance import write_corrected_copy

            write_corrected_copy(subject.loaded, evidence.ve_scales, req.write_ve_subject)
            ve_written = str(req.write_ve_subject)
    save_to = req.save_subject or (inputs.out_dir / SAVED_MODEL_DIR if req.save_model else None)
    saved = None
    if save_to is not None:
        if judgement.decision.verdict == "PASS" and req.save_format != "safetensors":
            from invarlock.edits import formats as edit_formats

            edit_formats.save_as(req.save_format, subject.loaded, evidence.edit_record or {},
                                 save_to)
            saved = str(save_to)
        elif judgement.decision.verdict == "PASS":
            loading.save_checkpoint(subject.loaded, save_to)
            saved = str(save_to)
        else:
            log.warning("verdict FAIL: the edited subject is discarded, nothing saved to %s",
                        save_to)
    return {"saved_subject": saved, "ve_subject": ve_written}


def write_outcome(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
                  subject: SubjectEvidence, judgement: Judgement,
                  artifacts: dict[str, str | None], req: CertifyRequest,
                  timer: Timer) -> CertifyOutcome:
    """Assemble and seal the certificate, render it, and write the set as a unit."""
    cert = _certificate(inputs, plan, baseline, subject, judgement, artifacts, req,
                        {**timer.spans, **subject.guard_seconds})
    sealed = document.seal(cert)
    renderings = {}
    if req.save_report:
        from invarlock import report

        renderings[document.HTML_FILENAME] = report.render(sealed, "html")
    try:
        path = document.write_certificate(sealed, inputs.out_dir, markdown.render(sealed),
                                          renderings)
    except OSError as exc:
        raise EvidenceError(f"cannot write the certificate to {outdir.shown(inputs.out_dir)}: "
                            f"{exc.strerror or exc}; nothing was written") from None
    report_path = inputs.out_dir / document.HTML_FILENAME if req.save_report else None
    return CertifyOutcome(sealed, path, inputs.out_dir / document.MARKDOWN_FILENAME,
                          report_path)


def _certificate(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
                 subject: SubjectEvidence, judgement: Judgement,
                 artifacts: dict[str, str | None], req: CertifyRequest,
                 timings: dict[str, float]) -> dict[str, Any]:
    """The stages' records handed to the certificate's assembly."""
    from invarlock.models import device as devices

    edit_name = req.edit.get("name") if req.edit else None
    return build.build_certificate(
        run_id=inputs.run_id,
        environment=build.environment_section(devices.describe_device(inputs.device),
                                              inputs.baseline.config, req.adapter, edit_name),
        policy=inputs.policy, tokenizer=inputs.tokenizer, tokenizer_hash=inputs.tokenizer_hash,
        corpus=plan.corpus, windows=plan.windows,
        baseline=build.Side(_record_now(baseline.record), judgement.base_sets),
        subject=build.Side(subject.record, subject.sets), edit=subject.edit_record,
        guards={o.name: o.section for o in subject.outcomes}, match=judgement.match,
        primary=judgement.primary, evidence=judgement.evidence, decision=judgement.decision,
        artifacts=artifacts, timings=timings,
        distribution=judgement.distribution,
        sequential=(sequential_run.section(subject.sequential)
                    if subject.sequential is not None else None),
        reference=provenance.record(req.reference,
                                    baseline_digest=baseline.cache_key.weights_digest,
                                    dataset_digest=plan.corpus.digest,
                                    policy_digest=inputs.policy.digest))


def _record_now(record: dict[str, Any]) -> dict[str, Any]:
    """The baseline's record as it stands: its blocks list grows while later subjects of
    the same run extend the baseline, and a sealed certificate must not change with it."""
    blocks = record.get("final_blocks")
    return {**record, **({} if blocks is None else {"final_blocks": [list(b) for b in blocks]})}
