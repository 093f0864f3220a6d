"""Stages 4 and 5: the subject made resident (the baseline edited in memory, or a
checkpoint), then scored on the same windows: fatal invariants first, the preview set, and
(unless stopped) the final set in looks, every guard measured through taps alongside."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from invarlock import gate, sequential_run
from invarlock.certificate import build
from invarlock.data.windows import WindowSet
from invarlock.enums import MetricKind
from invarlock.errors import InputError
from invarlock.stages import alternate, common
from invarlock.stages.common import guard_run, guard_taps, paired, placement, run_design
from invarlock.stages.records import (
    BaselineEvidence,
    CertifyRequest,
    EvaluationPlan,
    PreparedSubject,
    RunInputs,
    SubjectEvidence,
    Timer,
)

log = logging.getLogger(__name__)


def prepare_subject(inputs: RunInputs, req: CertifyRequest, timer: Timer,
                    base_model: Any = None) -> PreparedSubject:
    """The baseline edited in memory (loaded again if the cache spared it), or the subject
    checkpoint (loaded only once the baseline model is gone)."""
    from invarlock.models import loading

    t = time.perf_counter()
    if inputs.edit is not None:
        base = inputs.baseline
        if base_model is None:
            base_model = loading.load_model(base.source, adapter=base.adapter,
                                            device=inputs.device, dtype=req.dtype,
                                            allow_pickle=req.allow_pickle,
                                            dequantize=req.dequantize,
                                            tokenizer=inputs.tokenizer, **placement(req))
        prepared = _edited_subject(inputs, base_model, timer, req.save_format)
    else:
        assert inputs.subject is not None
        subj = inputs.subject
        loaded = load_checkpoint(inputs, req)
        record = build.model_record(subj.source, loaded.config, subj.adapter,
                                    loaded.weights_digest, "files",
                                    dtype=str(loaded.dtype).removeprefix("torch."),
                                    parameters=loaded.parameters)
        record["format"] = loaded.format
        record["tokenizer_source"] = inputs.subject_tokenizer
        prepared = PreparedSubject(loaded, record, None, None)
    timer.add("load_s", t)
    return prepared


def load_checkpoint(inputs: RunInputs, req: CertifyRequest) -> Any:
    """The subject checkpoint loaded from its path (read, never written to)."""
    from invarlock.models import loading

    assert inputs.subject is not None
    subj = inputs.subject
    return loading.load_model(subj.source, adapter=subj.adapter, device=inputs.device,
                              dtype=req.dtype, allow_pickle=req.allow_pickle,
                              dequantize=req.dequantize, **placement(req))


def apply_edit(inputs: RunInputs, base_model: Any, timer: Timer,
               save_format: str = "safetensors") -> Any:
    """The run's edit applied to `base_model` in place (then through the saved format's
    quantizer, so what is scored is what the file will hold); the EditResult."""
    from invarlock.edits import formats as edit_formats
    from invarlock.models import loading

    assert inputs.edit is not None
    if loading.has_offloaded_weights(base_model.model):
        raise InputError("the edit cannot change weights offloaded by the device map; "
                         "raise --max-memory, or certify a saved subject with --subject")
    t_edit = time.perf_counter()
    result = inputs.edit.impl.apply(base_model.model, inputs.edit.plan)
    if save_format != "safetensors":  # evaluate exactly what the saved file will hold
        result = edit_formats.shipped_as(save_format, base_model, result)
    timer.add("edit_s", t_edit)
    return result


def _edited_subject(inputs: RunInputs, base_model: Any, timer: Timer,
                    save_format: str = "safetensors") -> PreparedSubject:
    from invarlock.edits import formats as edit_formats
    from invarlock.models import loading

    result = apply_edit(inputs, base_model, timer, save_format)
    edit_record = build.edit_record(result)
    base = inputs.baseline
    digest = loading.tensor_digest(base_model.model)
    record = build.model_record(base.source, base.config, base.adapter, digest, "tensors",
                                dtype=str(base_model.dtype).removeprefix("torch."),
                                parameters=base_model.parameters,
                                produced_by=f"edit:{result.name}")
    record["kind"] = "edit"
    record["format"] = edit_formats.edit_format(save_format, result, base_model.model)
    return PreparedSubject(base_model, record, edit_record, digest)


def evaluate_subject(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
                     subject: PreparedSubject, req: CertifyRequest,
                     timer: Timer) -> SubjectEvidence:
    """Fatal invariants, then the preview set, then (unless stopped) the final set; each
    guard measured through taps on the same passes and decided against the baseline."""
    from invarlock import evaluate
    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.run import head
    from invarlock.models import formats, loading

    guards = guard_run(inputs, plan)
    guards.restore(baseline.guard_payload)
    model = subject.loaded.model
    kind, device = inputs.kind, inputs.device
    base_cfg, subj_cfg = (inputs.baseline.config, subject.loaded.config)
    if inputs.subject is not None:  # a GGUF side states only some config keys
        base_cfg, subj_cfg = formats.comparable_configs(
            inputs.baseline.source, base_cfg, inputs.subject.source, subj_cfg)
    ctx = SubjectContext(
        info=guards.info, model=model, config=subj_cfg,
        baseline_config=base_cfg, baseline_files=baseline.files,
        tokenizer_hashes=(inputs.tokenizer_hash,
                          inputs.subject_tokenizer_hash or inputs.tokenizer_hash),
        fingerprint=subject.fingerprint,
        calibration=head(plan.windows.final, int(guards.info.calibration_ids.size)),
        score=lambda m, windows: evaluate.evaluate_windows(
            m, windows, kind=kind, device=device, batch_size=req.batch_size),
        base_model_prefix=str(getattr(model, "base_model_prefix", "") or ""))
    with loading.weights_on_host(model):
        intact = guards.subject_loaded(ctx)

    preview_n = sequential_run.preview_needed(run_design(inputs, plan), plan.windows.preview.n)
    base_preview = baseline.scores.upto("preview", preview_n)
    try:
        preview = common.score(
            inputs, req, timer, model,
            sequential_run.evaluated(plan.windows.preview, preview_n), "subject",
            guard_taps(guards, model, "subject", "preview"), base_preview.distribution)
    except InputError as exc:
        if intact:
            raise
        # A subject of another shape may not even read the windows (a smaller vocabulary):
        # the invariants already failed it; record every window as broken.
        log.warning("the subject cannot read the windows (%s): every preview window is "
                    "recorded as broken", str(exc).split(";")[0])
        preview = _unscored(base_preview, kind)
    catastrophic = gate.is_catastrophic(
        kind, gate.summarize(kind, paired(base_preview, preview)),
        inputs.policy.primary_metric)
    final = sequential = None
    if not intact:
        log.info("%s failed before evaluation (fatal): final set not evaluated", guards.fatal)
    elif catastrophic:
        log.warning("preview ratio beyond the catastrophic limit: final set not evaluated")
    else:
        with alternate.alternating(inputs, req, timer, baseline, subject):
            final, sequential = _score_final(
                inputs, plan, baseline, base_preview, preview, req, timer, model,
                guard_taps(guards, model, "subject", "final"))
    ctx.scores = {"preview": preview, "final": final}
    with loading.weights_on_host(model):
        outcomes = guards.finish(ctx)
    probe = guards.probes.get("variance")
    scales = (dict(probe.scales) if probe is not None and guards.fatal is None
              and getattr(probe, "scales", None) is not None else None)
    seconds = {name: round(s + baseline.guard_seconds.get(name, 0.0), 4)
               for name, s in guards.timings().items()}
    return SubjectEvidence(record=subject.record, edit_record=subject.edit_record,
                           sets={"preview": preview, "final": final}, outcomes=outcomes,
                           gating=guards.gating(outcomes), ve_scales=scales,
                           guard_seconds=seconds, sequential=sequential)


def _score_final(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
                 base_preview: Any, preview: Any, req: CertifyRequest, timer: Timer,
                 model: Any, taps: Any) -> tuple[Any, Any]:
    """The final set, in looks that may stop it early when the sequential design is on; the
    baseline scores each block first (when it has not yet: beside the subject in lockstep,
    in its place under blocks, `stages.alternate`), and the subject's token distributions
    are compared with the baseline's on the same windows."""
    final_set = plan.windows.final
    scores = baseline.scores

    def score(windows: WindowSet) -> Any:
        return common.score(inputs, req, timer, model, windows, "subject", taps,
                            scores.sets["final"].distribution)

    design = run_design(inputs, plan)
    if design is None:
        scores.upto("final", final_set.n)
        return score(final_set), None
    return sequential_run.evaluate_in_looks(
        score, final_set, lambda n: scores.upto("final", n), inputs.kind, design,
        sequential_run.threshold_for(inputs.kind, inputs.policy),
        sequential_run.preview_floor(inputs.kind, base_preview.tokens, base_preview.values,
                                     preview.values))


def _unscored(base: Any, kind: MetricKind) -> Any:
    """The subject's results for windows it could not score: every value NaN (broken)."""
    from invarlock.evaluate import WindowScores

    n = len(base.window_ids)
    return WindowScores(kind=kind, window_ids=np.asarray(base.window_ids, dtype=np.int64),
                        sha256=tuple(base.sha256), tokens=np.asarray(base.tokens, dtype=np.int64),
                        values=np.full(n, np.nan), nonfinite_windows=n, seconds=0.0)
