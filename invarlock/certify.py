"""The certification pipeline, one stage per function, each handing the next a frozen record:

    validate_inputs    every input resolved and checked before anything is evaluated
    plan_evaluation    corpus → tokenized, deduplicated, disjoint preview/final windows
    evaluate_baseline  the baseline's per-window results and guard states (or the cache's)
    prepare_subject    the subject: the baseline edited in memory, or a checkpoint
    evaluate_subject   the subject on the same windows, its guards measured alongside
    judge              pairing, primary metric and guard checks → verdict
    write_outcome      the certificate, sealed and written

The baseline is scored only on the windows the decision needs (`invarlock.baseline_run`):
the design's preview windows and the final windows up to the first look first; then either
it stays resident beside the subject and scores each look's block on demand (lockstep, when
two models fit the memory budget), or it is edited in memory into the subject or dropped
before the subject is loaded, and a look past its windows swaps the two for the next block,
doubling the windows held (blocks: one model at a time, `stages.alternate`). Its results
come from the cache when this evaluation was done before, and later windows extend the
entry. A baseline evaluated once serves any number of subjects: `certify_subject` runs
the subject stages for one of them. The subject on disk is never written to. The preview set
is scored first and a catastrophic preview stops the run before the final set.

Each stage's body is a module of `invarlock.stages` (inputs, plan, baseline, subject, judge,
write; `served` for GGUF sides llama.cpp evaluates, `common` for what several share), and
the records they hand each other are in `invarlock.stages.records`; this module runs them in
order and is where callers import them from. The stages never import this module back.
"""

from __future__ import annotations

import time

from invarlock.stages.baseline import check_baseline_weights, evaluate_baseline, settle_baseline
from invarlock.stages.common import release_memory
from invarlock.stages.inputs import (
    check_dataset,
    check_subject,
    check_subject_tokenizer,
    new_run_id,
    validate_inputs,
)
from invarlock.stages.judge import judge
from invarlock.stages.plan import plan_evaluation
from invarlock.stages.records import (
    SAVED_MODEL_DIR,
    WINDOW_SETS,
    BaselineEvidence,
    CertifyOutcome,
    CertifyRequest,
    EditInput,
    EvaluationPlan,
    Judgement,
    ModelInput,
    PreparedSubject,
    RunInputs,
    SubjectEvidence,
    Timer,
)
from invarlock.stages.served import close_served, record_runtime
from invarlock.stages.subject import evaluate_subject, prepare_subject
from invarlock.stages.write import write_models, write_outcome

__all__ = [
    "SAVED_MODEL_DIR", "WINDOW_SETS", "BaselineEvidence", "CertifyOutcome", "CertifyRequest",
    "EditInput", "EvaluationPlan", "Judgement", "ModelInput", "PreparedSubject", "RunInputs",
    "SubjectEvidence", "Timer", "certify", "certify_subject", "check_baseline_weights",
    "check_dataset", "check_subject", "check_subject_tokenizer", "evaluate_baseline",
    "evaluate_subject", "judge", "new_run_id", "plan_evaluation", "prepare_subject",
    "release_memory", "settle_baseline", "validate_inputs", "write_outcome",
]


def certify(req: CertifyRequest) -> CertifyOutcome:
    """Run one certification and write its certificate; the verdict is in the outcome."""
    started = time.perf_counter()
    timer = Timer()
    inputs = validate_inputs(req, timer)
    try:
        plan = plan_evaluation(inputs, req, timer)
        baseline, base_model = evaluate_baseline(inputs, plan, req, timer)
        del base_model  # held by baseline.resident until the schedule says otherwise
        handed = settle_baseline(inputs, plan, req, baseline)
        subject = prepare_subject(inputs, req, timer, handed)
        del handed
        try:
            return certify_subject(inputs, plan, baseline, subject, req, timer, started)
        finally:
            baseline.resident.release()
    finally:
        inputs.output.release()


def certify_subject(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
                    subject: PreparedSubject, req: CertifyRequest, timer: Timer,
                    started: float) -> CertifyOutcome:
    """The subject stages for one subject against an already evaluated baseline."""
    try:
        evidence = evaluate_subject(inputs, plan, baseline, subject, req, timer)
    finally:
        close_served(inputs, "subject")
    record_runtime(inputs, req, "subject", plan.windows.seq_len, evidence.record)
    judgement = judge(inputs, plan, baseline, evidence)
    artifacts = write_models(inputs, req, subject, evidence, judgement)
    del subject
    release_memory()
    timer.spans["total_s"] = round(time.perf_counter() - started, 4)
    return write_outcome(inputs, plan, baseline, evidence, judgement, artifacts, req, timer)
