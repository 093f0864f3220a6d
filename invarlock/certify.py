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
two models fit the memory budget), or it scores the rest of the plan and is edited in memory
into the subject or dropped before the subject is loaded (blocks: one model at a time). Its
results come from the cache when this evaluation was done before, and later windows extend
the entry. A baseline evaluated once serves any number of subjects: `certify_subject` runs
the subject stages for one of them. The subject on disk is never written to. The preview set
is scored first and a catastrophic preview stops the run before the final set.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from invarlock import (
    __version__,
    baseline_run,
    distribution,
    distribution_gate,
    gate,
    outdir,
    provenance,
    sequential_run,
)
from invarlock.cache import BaselineCache, CacheKey, scores_from_payload, scores_to_payload
from invarlock.certificate import build, document, markdown, sequential_view
from invarlock.data.corpus import Corpus, DatasetSource, load_corpus
from invarlock.data.windows import WindowPlan, WindowSet, plan_windows
from invarlock.enums import AdapterKind, MetricKind
from invarlock.errors import EvidenceError, InputError
from invarlock.guards import ChainSettings
from invarlock.outdir import OutputFolder
from invarlock.policy import ResolvedPolicy, evidence_floor, resolve
from invarlock.subject_index import refuse_mixed_results

log = logging.getLogger(__name__)

SAVED_MODEL_DIR = "model"  # output.save_model: the edited subject goes here, inside out_dir
WINDOW_SETS = ("preview", "final")


@dataclass(frozen=True)
class CertifyRequest:
    """Everything one certification needs, already validated by the caller."""

    config: dict[str, Any]  # merged run config (seed shape); the policy is resolved from it
    baseline: str
    subject: str | None
    edit: dict[str, Any] | None  # the config's `edit` section when the subject is built in memory
    dataset: DatasetSource
    out_dir: Path | None  # None: runs/<run id>
    adapter: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    device_map: str | None = None  # spread each model over devices through accelerate
    max_memory: dict[int | str, int] | None = None  # bytes per device for the device map
    revision: str | None = None
    batch_size: int | None = None
    save_subject: Path | None = None
    write_ve_subject: Path | None = None  # write a VE-corrected copy of the subject here
    save_model: bool = False  # with an edit: save the edited subject to <out_dir>/model on PASS
    save_report: bool = False  # also write the HTML report into the certificate set
    use_cache: bool = True
    cache_dir: Path | None = None
    cache_secret: bytes | None = field(default=None, repr=False)  # signs cache entries
    cache_namespace: Any = None  # invarlock.cache.Namespace; None: the local folder layout
    reference: Any = None  # invarlock.provenance.Reference: origin and digest pins
    progress: bool = False
    edit_impl: Any = None  # an invarlock.edits.Edit to use instead of looking up edit["name"]
    gguf_file: str | None = None  # which GGUF file of a folder holding several
    dequantize: bool = False  # evaluate a quantized subject's float weights (no kernels here)
    save_format: str = "safetensors"  # --save-subject format: safetensors | gguf
    subjects: tuple[str, ...] = ()  # several subjects: `invarlock.subjects.certify_subjects`
    runtime: str = "auto"  # what evaluates a GGUF side: auto | llama.cpp | transformers


@dataclass(frozen=True)
class CertifyOutcome:
    certificate: dict[str, Any]
    path: Path
    markdown_path: Path
    report_path: Path | None = None

    @property
    def verdict(self) -> str:
        return self.certificate["verdict"]["status"]

    def stopped_by(self) -> str | None:
        """Why the final set was not evaluated, when a guard (not the preview) stopped it."""
        guard = markdown.stopped_by(self.certificate)
        return f"{guard} failed before evaluation" if guard else None

    def summary(self) -> dict[str, Any]:
        """The `--json` object: the verdict, the one number and where the evidence is."""
        pm = self.certificate["primary_metric"]
        return {
            "verdict": self.verdict,
            "kind": pm["kind"],
            "ratio": pm["ratio"],
            "ratio_ci": pm["ratio_ci"],
            "delta_ci": pm["delta"]["ci"] if pm["delta"] else None,
            "ci_level": round(1 - pm["bootstrap"]["alpha"], 12) if pm["bootstrap"] else None,
            "gate_value": pm["gate_value"],
            "basis": pm["basis"],
            "limit": pm["limit"],
            "alpha": pm["bootstrap"]["alpha"] if pm["bootstrap"] else None,
            "catastrophic": pm["catastrophic"],
            "reasons": self.certificate["verdict"]["reasons"],
            "guards": {name: {"mode": g["mode"], "passed": g["passed"],
                              "measured": _measured(g)}
                       for name, g in self.certificate["guards"].items()},
            "stopped": self.stopped_by(),
            "sequential": getattr(sequential_view.view(self.certificate), "phrase", None),
            "run_id": self.certificate["run_id"],
            "certificate": str(self.path),
            "markdown": str(self.markdown_path),
            **({"report": str(self.report_path)} if self.report_path else {}),
        }


def _measured(section: dict[str, Any]) -> bool:
    return bool((section.get("measurements") or {}).get("evaluated", True))


# --- records the stages hand each other ------------------------------------------------------

@dataclass(frozen=True)
class ModelInput:
    """A checkpoint as resolved before loading: where it is, its config and adapter."""

    source: Any  # invarlock.models.source.ModelSource
    config: dict[str, Any]
    adapter: AdapterKind


@dataclass(frozen=True)
class EditInput:
    """The in-memory edit that builds the subject, its plan already parsed."""

    impl: Any  # invarlock.edits.Edit
    plan: Any


@dataclass(frozen=True)
class RunInputs:
    """Stage 1 output: every input of the run, resolved and checked."""

    run_id: str
    device: str
    baseline: ModelInput
    subject: ModelInput | None  # None: the subject is the baseline with `edit` applied
    edit: EditInput | None
    policy: ResolvedPolicy
    chain: ChainSettings
    tokenizer: Any
    tokenizer_hash: str
    out_dir: Path
    output: OutputFolder  # claimed (created, probed, locked) until the run ends
    subject_tokenizer: str | None = None  # where the subject's tokenizer came from
    subject_tokenizer_hash: str | None = None  # None: an in-memory edit keeps the baseline's
    served: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # ^ llama.cpp models open for this run, by their settings (see `_score`)

    @property
    def kind(self) -> MetricKind:
        return self.baseline.adapter.metric


@dataclass(frozen=True)
class EvaluationPlan:
    """Stage 2 output: the corpus and the windows both models are scored on."""

    corpus: Corpus
    windows: WindowPlan


@dataclass(frozen=True)
class BaselineEvidence:
    """Stage 3 output: what every subject is compared with; no model is held here."""

    sets: dict[str, Any]  # "preview"/"final" → WindowScores (or the cache's copy)
    parameters: int
    files: list[Path]
    cache_key: CacheKey
    cache_digest: str | None  # digest of the cache payload read or written (None: cache off)
    guard_payload: dict[str, Any]  # baseline guard states, as the cache stores them
    guard_seconds: dict[str, float]  # time the guards spent on the baseline pass
    record: dict[str, Any]  # the certificate's `baseline` section
    scores: Any = None  # invarlock.baseline_run.BaselineScores: `sets`, extended on demand
    resident: Any = None  # _ResidentBaseline: the baseline model while lockstep keeps it


@dataclass(frozen=True)
class PreparedSubject:
    """Stage 4 output: the subject resident for scoring, and what the certificate says of it."""

    loaded: Any  # invarlock.models.loading.LoadedModel
    record: dict[str, Any]
    edit_record: dict[str, Any] | None
    fingerprint: str | None  # tensor digest of an in-memory subject, for the invariants


@dataclass(frozen=True)
class SubjectEvidence:
    """Stage 5 output: the subject's per-window results and every guard's outcome."""

    record: dict[str, Any]  # the certificate's `subject` section
    edit_record: dict[str, Any] | None
    sets: dict[str, Any]  # "preview" → WindowScores, "final" → WindowScores or None
    outcomes: list[Any]  # invarlock.guards.GuardOutcome, chain order
    gating: list[str]  # gating flags the guards add
    ve_scales: dict[str, float] | None  # the VE guard's proposal, when it ran
    guard_seconds: dict[str, float]
    sequential: Any = None  # invarlock.sequential_run.SequentialOutcome when the design ran


@dataclass(frozen=True)
class Judgement:
    """Stage 6 output: the numbers and the verdict."""

    match: float
    primary: gate.PrimaryMetricResult
    decision: gate.Decision
    evidence: gate.Evidence  # the evidence collected against the profile's floor
    distribution: dict[str, Any] | None = None  # the distribution evidence, when measured
    base_sets: dict[str, Any] = field(default_factory=dict)  # the baseline's, cut to the
    # windows the subject was evaluated on: what the certificate pairs


@dataclass
class _Timer:
    spans: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.spans[name] = round(self.spans.get(name, 0.0) + time.perf_counter() - start, 4)


# --- the pipeline ----------------------------------------------------------------------------

def certify(req: CertifyRequest) -> CertifyOutcome:
    """Run one certification and write its certificate; the verdict is in the outcome."""
    started = time.perf_counter()
    timer = _Timer()
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


def settle_baseline(inputs: RunInputs, plan: EvaluationPlan, req: CertifyRequest,
                    baseline: BaselineEvidence) -> Any:
    """Choose how the baseline keeps pace with the subject (`baseline_run.schedule`).

    Lockstep keeps the baseline model resident beside the subject, scoring each look's block
    on demand (an in-memory edit then gets its own copy). Blocks scores the rest of the plan
    now, with only the baseline resident, and lets the model go; returned (for an edit to
    consume) instead of dropped. Returns the model handed to `prepare_subject`, or None."""
    resident = baseline.resident
    schedule = _schedule(inputs, req, plan, resident)
    baseline.record["schedule"] = schedule.value
    log.info("baseline schedule: %s", schedule.value)
    if schedule is baseline_run.Schedule.LOCKSTEP:
        return None
    for name in WINDOW_SETS:
        baseline.scores.upto(name, _needed(inputs, plan, name))
    model = resident.take()
    if inputs.edit is None and model is not None:
        model = None  # one model resident at a time: the baseline leaves first
        _release_memory()
    return model


def _needed(inputs: RunInputs, plan: EvaluationPlan, name: str) -> int:
    """Windows of set `name` the decision can need at most: all planned final windows, the
    design's cut of the preview."""
    if name == "final":
        return plan.windows.final.n
    return sequential_run.preview_needed(_design(inputs, plan), plan.windows.preview.n)


def _design(inputs: RunInputs, plan: EvaluationPlan) -> Any:
    return sequential_run.design_for(inputs.policy, plan.windows.final.n,
                                     plan.windows.preview.n)


def _schedule(inputs: RunInputs, req: CertifyRequest, plan: EvaluationPlan,
              resident: _ResidentBaseline) -> baseline_run.Schedule:
    """Lockstep when a design may stop early and a second model fits the memory budget
    beside the first (or two fit, when the cache spared loading the baseline); blocks for a
    device map, and when llama.cpp serves a side (its models are opened per side)."""
    from invarlock.models import device as devices

    if _design(inputs, plan) is None:
        return baseline_run.Schedule.BLOCKS  # nothing to save: the plan is scored anyway
    seq_len = plan.windows.seq_len
    served = any(_runtime_settings(inputs, req, side, seq_len) is not None
                 for side in ("baseline", "subject"))
    one = resident.model_bytes()
    needed = one if resident.model is not None else 2 * one
    return baseline_run.schedule(needed, devices.free_memory(inputs.device),
                                 placed=req.device_map is not None or served)


def certify_subject(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
                    subject: PreparedSubject, req: CertifyRequest, timer: _Timer,
                    started: float) -> CertifyOutcome:
    """The subject stages for one subject against an already evaluated baseline."""
    try:
        evidence = evaluate_subject(inputs, plan, baseline, subject, req, timer)
    finally:
        _close_served(inputs, "subject")
    _record_runtime(inputs, req, "subject", plan.windows.seq_len, evidence.record)
    judgement = judge(inputs, plan, baseline, evidence)
    artifacts = _write_models(inputs, req, subject, evidence, judgement)
    del subject
    _release_memory()
    timer.spans["total_s"] = round(time.perf_counter() - started, 4)
    return write_outcome(inputs, plan, baseline, evidence, judgement, artifacts, req, timer)


# --- stage 1: inputs -------------------------------------------------------------------------

def validate_inputs(req: CertifyRequest, timer: _Timer) -> RunInputs:
    """Resolve models, policy, guard settings, data and tokenizers, and claim the output
    folder; every input error surfaces here, before anything is evaluated.

    On success the output folder is held (locked) for the run: the caller releases it.
    """
    from invarlock.models import device as devices
    from invarlock.models import formats, loading, source, tokenizer

    t = time.perf_counter()
    run_id = _run_id()
    out_dir = req.out_dir if req.out_dir is not None else Path("runs") / run_id
    for path, what in ((req.save_subject, "--save-subject folder"),
                       (req.write_ve_subject, "--write-ve-subject folder")):
        if path is not None:
            outdir.check_folder_target(path, what)
    check_dataset(req.dataset)
    device = devices.resolve_device(req.device)
    base_src = source.resolve_model_source(req.baseline, revision=req.revision,
                                           gguf_file=req.gguf_file)
    base_cfg = source.read_config(base_src)
    baseline = ModelInput(base_src, base_cfg, source.detect_adapter(base_cfg, req.adapter))
    formats.check_loadable(base_src, base_cfg, device, req.dequantize)
    subject = (check_subject(req.subject, baseline, req, device)
               if req.subject is not None else None)
    if len(req.subjects) <= 1:  # several subjects: each may be the one a flag is for
        formats.check_flags_apply([(m.source, m.config) for m in (baseline, subject) if m],
                                  req.gguf_file, req.dequantize)
    _check_runtime(req, baseline, subject, device)
    policy = resolve(req.config, context_length=source.context_length(base_cfg))
    provenance.check_policy_pin(req.reference, policy.digest)
    provenance.check_baseline_pin(req.reference, lambda: source.weights_digest(
        source.weight_files(base_src, req.allow_pickle)))
    chain = ChainSettings.from_policy(policy.values.get("guards"))  # bad guard config: fail now
    sequential_run.design_for(policy, policy.windows.final_n)  # bad sequential config: too
    edit = _parse_edit(req) if req.edit is not None else None
    _seed_everything(policy.windows.seed)

    base_tok = loading.load_tokenizer(base_src)
    tok_hash = tokenizer.tokenizer_hash(base_tok)
    subject_tokenizer = subj_hash = None
    if subject is not None:
        subject_tokenizer, subj_hash = check_subject_tokenizer(subject, base_tok, tok_hash)
    output = outdir.claim(out_dir, check=lambda folder: refuse_mixed_results(
        folder, req.subjects))  # last: an input error above leaves no folder behind
    timer.add("resolve_s", t)
    return RunInputs(run_id=run_id, device=device, baseline=baseline, subject=subject,
                     edit=edit, policy=policy, chain=chain, tokenizer=base_tok,
                     tokenizer_hash=tok_hash, out_dir=out_dir, output=output,
                     subject_tokenizer=subject_tokenizer, subject_tokenizer_hash=subj_hash)


def check_dataset(dataset: DatasetSource) -> None:
    """A local dataset must be a readable file or folder (read in full at the next stage)."""
    if dataset.provider not in ("text", "jsonl") or dataset.path is None:
        return
    path = Path(str(dataset.path)).expanduser()
    try:
        ok = path.is_file() or path.is_dir()
        readable = os.access(path, os.R_OK)
    except OSError as exc:
        raise InputError(f"dataset {outdir.shown(path)} cannot be used: "
                         f"{exc.strerror or exc}") from None
    if not ok:
        raise InputError(f"dataset {outdir.shown(path)} not found")
    if not readable:
        raise InputError(f"dataset {outdir.shown(path)} is not readable")


def check_subject(spec: str, baseline: ModelInput, req: CertifyRequest,
                  device: str = "cpu") -> ModelInput:
    """Resolve one subject checkpoint; it must be the same kind of model as the baseline,
    and a quantized one must be runnable here (its backend installed, kernels or
    --dequantize)."""
    from invarlock.models import formats, source

    src = source.resolve_model_source(spec, revision=req.revision, gguf_file=req.gguf_file)
    config = source.read_config(src)
    adapter = source.detect_adapter(config, req.adapter)
    if adapter is not baseline.adapter:
        raise InputError(f"baseline is {baseline.adapter} but subject is {adapter}: "
                         "they must be the same kind of model")
    formats.check_same_architecture(baseline.config, config, src, baseline.source)
    formats.check_loadable(src, config, device, req.dequantize)
    subject = ModelInput(src, config, adapter)
    _probe_runtime(req, subject, device, edited=False)
    return subject


def _check_runtime(req: CertifyRequest, baseline: ModelInput,
                   subject: ModelInput | None, device: str) -> None:
    """--runtime: llama.cpp needs its extra and a GGUF side, and reads the baseline's file."""
    from invarlock.models import llamacpp
    from invarlock.models.source import gguf_path

    sides = [baseline] + ([subject] if subject is not None else [])
    ggufs = [p for p in (gguf_path(s.source) for s in sides) if p is not None]
    llamacpp.check_request(llamacpp.parse_runtime(req.runtime), ggufs)
    _probe_runtime(req, baseline, device, edited=req.edit is not None)


def _probe_runtime(req: CertifyRequest, side: ModelInput, device: str, *,
                   edited: bool) -> None:
    """A GGUF side llama.cpp will evaluate must be readable by it: found before evaluating."""
    from invarlock.models import llamacpp
    from invarlock.models.source import gguf_path

    path = gguf_path(side.source)
    if llamacpp.uses_llamacpp(llamacpp.parse_runtime(req.runtime), path, edited=edited,
                              device=device):
        assert path is not None
        vocab = side.config.get("vocab_size")
        llamacpp.probe(path, vocab if isinstance(vocab, int) else None)


def check_subject_tokenizer(subject: ModelInput, base_tok: Any,
                            tok_hash: str) -> tuple[str, str]:
    """The subject must tokenize exactly as the baseline does, or no window pairs up.

    Returns where its tokenizer came from (a GGUF file may embed one, or none) and its hash
    for the invariants guard.
    """
    from invarlock.models import tokenizer

    return tokenizer.check_subject_tokenizer(base_tok, tok_hash, subject.source)


def _parse_edit(req: CertifyRequest) -> EditInput:
    from invarlock.edits import get_edit

    assert req.edit is not None
    impl = req.edit_impl or get_edit(req.edit["name"])
    return EditInput(impl, impl.parse_plan(req.edit))


# --- stage 2: windows ------------------------------------------------------------------------

def plan_evaluation(inputs: RunInputs, req: CertifyRequest, timer: _Timer) -> EvaluationPlan:
    """Read the corpus and cut the paired windows both models will be scored on."""
    t = time.perf_counter()
    corpus = load_corpus(req.dataset, labelled=inputs.kind is MetricKind.ACCURACY)
    provenance.check_dataset_pin(req.reference, corpus.digest)
    wp = inputs.policy.windows
    windows = plan_windows(corpus, inputs.tokenizer, kind=inputs.kind, seq_len=wp.seq_len,
                           stride=wp.stride, preview_n=wp.preview_n, final_n=wp.final_n,
                           seed=wp.seed, strict=wp.strict, tokenizer_hash=inputs.tokenizer_hash)
    timer.add("windows_s", t)
    return EvaluationPlan(corpus, windows)


# --- stage 3: baseline -----------------------------------------------------------------------

def evaluate_baseline(inputs: RunInputs, plan: EvaluationPlan, req: CertifyRequest,
                      timer: _Timer) -> tuple[BaselineEvidence, Any]:
    """The baseline's results on the windows every run needs (the design's preview windows
    and the final windows up to its first look; the whole plan without a design), from the
    cache when this evaluation was done before. Further windows are scored on demand through
    the evidence's `scores` (`invarlock.baseline_run`).

    Returns the evidence and the loaded baseline model (None when it came from the cache);
    the model is also held by the evidence's `resident` until the schedule lets it go.
    """
    from invarlock.models import device as devices
    from invarlock.models import formats, source

    base = inputs.baseline
    files = source.weight_files(base.source, req.allow_pickle)
    dtype = devices.resolve_dtype(req.dtype, inputs.device, devices.checkpoint_dtype(base.config))
    key = CacheKey(source.weights_digest(files), inputs.tokenizer_hash, plan.windows.digest,
                   str(inputs.kind), str(dtype).removeprefix("torch."),
                   _device_tag(inputs, req, plan.windows.seq_len), __version__)
    design = _design(inputs, plan)
    need = {"preview": sequential_run.preview_needed(design, plan.windows.preview.n),
            "final": sequential_run.final_needed_first(design, plan.windows.final.n)}
    guards = _guard_run(inputs, plan)
    cache = (BaselineCache(req.cache_dir, secret=req.cache_secret,
                           namespace=req.cache_namespace) if req.use_cache else None)
    hit = cache.load(key) if cache else None
    top_k = _distribution_k(inputs, req, plan.windows.seq_len)
    cached = _usable(hit, plan, need, guards, top_k)
    resident = _ResidentBaseline(inputs, req, timer, top_k, files)
    cache_digest = None
    if cached is not None and hit is not None:
        sets, parameters = cached
        guard_payload = dict(hit.payload.get("guards") or {})
        cache_digest = hit.digest
    else:
        model = resident.load()
        with _weights_on_host(model.model):
            guards.baseline_loaded(model.model)
        sets = {name: _score(inputs, req, timer, model.model,
                             sequential_run.evaluated(getattr(plan.windows, name), need[name]),
                             "baseline", _taps(guards, model.model, "baseline", name), top_k)
                for name in WINDOW_SETS}
        broken = sum(s.nonfinite_windows for s in sets.values())
        if broken:
            raise EvidenceError(f"the baseline produced non-finite outputs on {broken} windows; "
                                "there is nothing sound to compare the subject with")
        parameters = int(model.parameters)
        guard_payload = guards.baseline_done()
    record = build.model_record(base.source, base.config, base.adapter, key.weights_digest,
                                "files", dtype=key.dtype, parameters=parameters,
                                from_cache=cached is not None)
    record["format"] = formats.describe_files(base.source, base.config, inputs.device,
                                              req.dequantize)
    _record_runtime(inputs, req, "baseline", plan.windows.seq_len, record)

    def stored(current: dict[str, Any]) -> None:
        """The cache entry rewritten with every window scored so far (a later subject
        finds them there); the certificate records the digest of the entry it rests on."""
        if cache:
            record["cache_payload_digest"] = cache.store(
                key, {**scores_to_payload(current, parameters), "guards": guard_payload})

    record["cache_payload_digest"] = cache_digest
    scores = baseline_run.BaselineScores(plan.windows, sets, score=resident.score,
                                         stored=stored)
    if cached is None:
        stored(scores.sets)
    evidence = BaselineEvidence(sets=scores.sets, parameters=parameters, files=files,
                                cache_key=key, cache_digest=cache_digest,
                                guard_payload=guard_payload, guard_seconds=guards.timings(),
                                record=record, scores=scores, resident=resident)
    return evidence, resident.model


def _usable(hit: Any, plan: EvaluationPlan, need: dict[str, int], guards: Any,
            top_k: int | None) -> tuple[dict[str, Any], int] | None:
    """The cache entry's results when they can stand for this run's baseline: a prefix of
    each planned set, at least the windows every run scores, the guards' states for these
    settings and, for a language model, the distribution evidence."""
    cached = scores_from_payload(hit.payload) if hit else None
    if cached is None:
        return None
    if not guards.restore(hit.payload.get("guards")):
        log.info("baseline cache entry lacks these guard settings; evaluating the baseline")
        return None
    if top_k is not None and any(s.distribution is None for s in cached[0].values()):
        log.info("baseline cache entry lacks the distribution evidence; evaluating the baseline")
        return None
    for name in WINDOW_SETS:
        ids = cached[0][name].window_ids
        if not baseline_run.is_prefix(getattr(plan.windows, name).window_ids, ids) \
                or ids.size < need[name]:
            log.info("baseline cache entry holds too few %s windows; evaluating the baseline",
                     name)
            return None
    return cached


class _ResidentBaseline:
    """The baseline model, loaded when a block of windows needs it and held until released
    (lockstep keeps it beside the subject; blocks lets it go before the subject loads)."""

    def __init__(self, inputs: RunInputs, req: CertifyRequest, timer: _Timer,
                 top_k: int | None, files: list[Path]) -> None:
        self.inputs, self.req, self.timer, self.top_k = inputs, req, timer, top_k
        self.files = files
        self.model: Any = None  # invarlock.models.loading.LoadedModel

    def load(self) -> Any:
        from invarlock.models import loading

        if self.model is None:
            base, req = self.inputs.baseline, self.req
            t = time.perf_counter()
            self.model = loading.load_model(base.source, adapter=base.adapter,
                                            device=self.inputs.device, dtype=req.dtype,
                                            allow_pickle=req.allow_pickle,
                                            dequantize=req.dequantize,
                                            tokenizer=self.inputs.tokenizer, **_placement(req))
            self.timer.add("load_s", t)
            with loading.weights_on_host(self.model.model):
                check_baseline_weights(self.model.model)
        return self.model

    def score(self, windows: WindowSet) -> Any:
        """The baseline's results on `windows` (no guard taps: the guards' windows are
        among the first ones, scored before any subject)."""
        model = self.load()
        return _score(self.inputs, self.req, self.timer, model.model, windows, "baseline",
                      None, self.top_k)

    def model_bytes(self) -> int:
        """Bytes one model of this architecture holds: its parameters once loaded, its
        weight files' size before."""
        if self.model is not None:
            return sum(p.numel() * p.element_size() for p in self.model.model.parameters())
        return sum(Path(f).stat().st_size for f in self.files)

    def take(self) -> Any:
        """Hand the model over (an edit consumes it) and hold it no longer."""
        model, self.model = self.model, None
        _close_served(self.inputs, "baseline")
        return model

    def release(self) -> None:
        if self.take() is not None:
            _release_memory()


def check_baseline_weights(model: Any) -> None:
    """A baseline with NaN or Inf weights is no reference: stop before measuring anything."""
    from invarlock.models.health import nonfinite_parameters

    bad = nonfinite_parameters(model)
    if bad:
        raise EvidenceError(f"the baseline has non-finite weights in {len(bad)} tensor(s) "
                            f"(first: {bad[0]}); there is nothing sound to compare the subject "
                            "with")


# --- stage 4: subject ------------------------------------------------------------------------

def prepare_subject(inputs: RunInputs, req: CertifyRequest, timer: _Timer,
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
                                            tokenizer=inputs.tokenizer, **_placement(req))
        prepared = _edited_subject(inputs, base_model, timer, req.save_format)
    else:
        assert inputs.subject is not None
        subj = inputs.subject
        loaded = loading.load_model(subj.source, adapter=subj.adapter, device=inputs.device,
                                    dtype=req.dtype, allow_pickle=req.allow_pickle,
                                    dequantize=req.dequantize, **_placement(req))
        record = build.model_record(subj.source, loaded.config, subj.adapter,
                                    loaded.weights_digest, "files",
                                    dtype=str(loaded.dtype).removeprefix("torch."),
                                    parameters=loaded.parameters)
        record["format"] = loaded.format
        record["tokenizer_source"] = inputs.subject_tokenizer
        prepared = PreparedSubject(loaded, record, None, None)
    timer.add("load_s", t)
    return prepared


def _edited_subject(inputs: RunInputs, base_model: Any, timer: _Timer,
                    save_format: str = "safetensors") -> PreparedSubject:
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


# --- stage 5: subject evaluation and guards --------------------------------------------------

def evaluate_subject(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
                     subject: PreparedSubject, req: CertifyRequest,
                     timer: _Timer) -> SubjectEvidence:
    """Fatal invariants, then the preview set, then (unless stopped) the final set; each
    guard measured through taps on the same passes and decided against the baseline."""
    from invarlock import evaluate
    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.run import head
    from invarlock.models import formats, loading

    guards = _guard_run(inputs, plan)
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

    preview_n = sequential_run.preview_needed(_design(inputs, plan), plan.windows.preview.n)
    base_preview = baseline.scores.upto("preview", preview_n)
    try:
        preview = _score(inputs, req, timer, model,
                         sequential_run.evaluated(plan.windows.preview, preview_n), "subject",
                         _taps(guards, model, "subject", "preview"), base_preview.distribution)
    except InputError as exc:
        if intact:
            raise
        # A subject of another shape may not even read the windows (a smaller vocabulary):
        # the invariants already failed it; record every window as broken.
        log.warning("the subject cannot read the windows (%s): every preview window is "
                    "recorded as broken", str(exc).split(";")[0])
        preview = _unscored(base_preview, kind)
    catastrophic = gate.is_catastrophic(
        kind, gate.summarize(kind, _paired(base_preview, preview)),
        inputs.policy.primary_metric)
    final = sequential = None
    if not intact:
        log.info("%s failed before evaluation (fatal): final set not evaluated", guards.fatal)
    elif catastrophic:
        log.warning("preview ratio beyond the catastrophic limit: final set not evaluated")
    else:
        final, sequential = _score_final(inputs, plan, baseline, base_preview, preview, req,
                                         timer, model, _taps(guards, model, "subject", "final"))
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
                 base_preview: Any, preview: Any, req: CertifyRequest, timer: _Timer,
                 model: Any, taps: Any) -> tuple[Any, Any]:
    """The final set, in looks that may stop it early when the sequential design is on; the
    baseline scores each block first (when it has not yet), and the subject's token
    distributions are compared with the baseline's on the same windows."""
    final_set = plan.windows.final
    scores = baseline.scores

    def score(windows: WindowSet) -> Any:
        return _score(inputs, req, timer, model, windows, "subject", taps,
                      scores.sets["final"].distribution)

    design = _design(inputs, plan)
    if design is None:
        scores.upto("final", final_set.n)
        return score(final_set), None
    return sequential_run.evaluate_in_looks(
        score, final_set, lambda n: scores.upto("final", n), inputs.kind, design,
        sequential_run.threshold_for(inputs.kind, inputs.policy),
        sequential_run.preview_floor(inputs.kind, base_preview.tokens, base_preview.values,
                                     preview.values))


def _placement(req: CertifyRequest) -> dict[str, Any]:
    """Device-map arguments for load_model (none without --device-map)."""
    if req.device_map is None:
        return {}
    return {"device_map": req.device_map, "max_memory": req.max_memory}


# --- stage 6: verdict ------------------------------------------------------------------------

def judge(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
          subject: SubjectEvidence) -> Judgement:
    """Pairing, the primary metric with its interval, and every check → the verdict."""
    from invarlock.models import source

    windows = plan.windows
    evaluated, base_sets = _evaluated(windows, baseline.sets, subject.sets)
    match = _match(evaluated, base_sets, subject.sets)
    if match < 1.0:
        raise EvidenceError(f"pairing broken: only {match:.2%} of windows were fed to both "
                            "models exactly as planned")
    preview = _paired(base_sets["preview"], subject.sets["preview"])
    final = (_paired(base_sets["final"], subject.sets["final"])
             if subject.sets["final"] is not None else None)
    policy = inputs.policy
    design = subject.sequential.design if subject.sequential is not None else None
    pm = gate.primary_metric(inputs.kind, preview, final, policy.primary_metric,
                             sequential_run.fixed_bootstrap(policy.bootstrap, design))
    dist = _distribution_section(inputs, baseline, subject)
    limits = distribution_gate.Limits.from_policy(policy.values.get("distribution"))
    context = source.context_length(inputs.baseline.config)
    evidence = gate.Evidence(evidence_floor(policy.profile, context), windows.preview.n,
                             windows.final.n, windows.seq_len, policy.bootstrap.replicates,
                             windows.requested, policy.allow_underpowered, context,
                             policy.weakened + distribution_gate.shortfall(
                                 limits, dist is not None, inputs.kind.is_perplexity))
    checks = [gate.pairing_check(match, windows.overlap(), windows.preview.n, windows.final.n),
              *sequential_run.primary_checks(pm, policy.primary_metric, subject.sequential),
              evidence.check(),
              *([distribution_gate.check(dist["checks"])] if dist is not None else []),
              *(o.check for o in subject.outcomes)]
    decision = gate.decide(checks, [*gate.primary_gating(evidence.floor),
                                    *distribution_gate.gating(limits, dist is not None),
                                    *subject.gating])
    return Judgement(match, pm, decision, evidence, dist, base_sets)


def _evaluated(windows: WindowPlan, base_sets: dict[str, Any],
               subj_sets: dict[str, Any]) -> tuple[WindowPlan, dict[str, Any]]:
    """The plan and the baseline's results cut to the windows the subject was evaluated on
    (the design's preview cut, the final windows up to the look that decided; none of the
    final set when it was not evaluated)."""
    cut = {name: 0 if subj_sets[name] is None else len(subj_sets[name].window_ids)
           for name in WINDOW_SETS}
    plan = dataclasses.replace(windows, **{
        name: sequential_run.evaluated(getattr(windows, name), n)
        for name, n in cut.items() if subj_sets[name] is not None})
    return plan, {name: sequential_run.head_scores(base_sets[name], n)
                  for name, n in cut.items()}


# --- stage 7: write --------------------------------------------------------------------------

def _write_models(inputs: RunInputs, req: CertifyRequest, subject: PreparedSubject,
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
                  timer: _Timer) -> CertifyOutcome:
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
        baseline=build.Side(dict(baseline.record), judgement.base_sets),
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


# --- helpers ---------------------------------------------------------------------------------

def _weights_on_host(model: Any) -> Any:
    from invarlock.models import loading

    return loading.weights_on_host(model)


def _guard_run(inputs: RunInputs, plan: EvaluationPlan) -> Any:
    from invarlock.guards.measure.run import GuardRun, run_info

    preview_n = sequential_run.preview_needed(_design(inputs, plan), plan.windows.preview.n)
    return GuardRun(inputs.chain, inputs.policy.values.get("guards") or {},
                    run_info(inputs.kind, inputs.device, plan.windows, inputs.chain,
                             inputs.policy, preview_n=preview_n))


def _taps(guards: Any, model: Any, role: str, phase: str) -> list[Any]:
    """The guards' taps for one pass over `model`. Setting one up may read weights (the RMT
    probe's balancing scales), so weights a device map offloaded are brought to the host for
    it, as for every other guard step that reads them."""
    from invarlock.models import loading

    with loading.weights_on_host(model):
        return guards.taps(model, role, phase)


def _score(inputs: RunInputs, req: CertifyRequest, timer: _Timer, model: Any,
           windows: WindowSet, label: str, taps: Any = None, dist: Any = None) -> Any:
    """One side's per-window results: from the torch model, or, for a GGUF side llama.cpp
    evaluates, from llama.cpp (a torch pass then runs only to feed the guards' taps)."""
    from invarlock import evaluate
    from invarlock.models.device import keep_heap_warm

    t0 = time.perf_counter()
    keep_heap_warm()
    served = _served(inputs, req, label, int(windows.input_ids.shape[1]))
    if served is None or taps:
        scores = evaluate.evaluate_windows(model, windows, kind=inputs.kind,
                                           device=inputs.device, batch_size=req.batch_size,
                                           taps=taps or None, progress=req.progress,
                                           distribution=dist)
    if served is not None:
        scores = evaluate.evaluate_with_runtime(served, windows, kind=inputs.kind,
                                                progress=req.progress)
    timer.add(f"{label}_eval_s", t0)
    return scores


def _distribution_section(inputs: RunInputs, baseline: BaselineEvidence,
                          subject: SubjectEvidence) -> dict[str, Any] | None:
    """The subject's distribution evidence on the set the primary metric rests on (the final
    set, or the preview when the final was not evaluated); None when there is none."""
    name = "final" if subject.sets["final"] is not None else "preview"
    scores = subject.sets[name]
    comparison = getattr(scores, "distribution", None)
    if not isinstance(comparison, distribution.TokenComparison) or scores.nonfinite_windows \
            or comparison.kld.size == 0:
        return None
    boot = inputs.policy.bootstrap
    return distribution.summarize(
        comparison, set_name=name, top_k=baseline.sets[name].distribution.k,
        limits=distribution_gate.Limits.from_policy(inputs.policy.values.get("distribution")),
        replicates=boot.replicates, seed=boot.seed, alpha=boot.alpha)


# --- GGUF evaluated by llama.cpp (invarlock.models.llamacpp) ---------------------------------

def _runtime_settings(inputs: RunInputs, req: CertifyRequest, label: str,
                      seq_len: int) -> Any:
    """How llama.cpp runs the side `label`, when it is a GGUF file llama.cpp evaluates."""
    from invarlock.models import llamacpp
    from invarlock.models.source import gguf_path

    side = inputs.baseline if label == "baseline" else inputs.subject
    if side is None:  # the subject is the baseline edited in memory
        return None
    path = gguf_path(side.source)
    if not llamacpp.uses_llamacpp(llamacpp.parse_runtime(req.runtime), path,
                                  edited=inputs.edit is not None, device=inputs.device):
        return None
    assert path is not None
    return llamacpp.Settings.for_windows(path, seq_len, inputs.device)


def _distribution_k(inputs: RunInputs, req: CertifyRequest, seq_len: int) -> int | None:
    """How many next-token log-probabilities the baseline keeps per scored token: none for a
    classifier, nor for a baseline llama.cpp scores (it returns per-token losses only), so
    such a baseline's cache entry is complete without them."""
    if inputs.kind is MetricKind.ACCURACY:
        return None
    if _runtime_settings(inputs, req, "baseline", seq_len) is not None:
        return None
    return distribution.TOP_K


def _served(inputs: RunInputs, req: CertifyRequest, label: str, seq_len: int) -> Any:
    """The side's llama.cpp model, loaded once per run and side (None: scored by torch)."""
    settings = _runtime_settings(inputs, req, label, seq_len)
    if settings is None:
        return None
    if settings not in inputs.served:
        from invarlock.models.llamacpp import LlamaCppModel

        inputs.served[settings] = LlamaCppModel(settings)
    return inputs.served[settings]


def _close_served(inputs: RunInputs, label: str) -> None:
    """Unload the side's llama.cpp model once its windows are scored."""
    from invarlock.models.source import gguf_path

    side = inputs.baseline if label == "baseline" else inputs.subject
    path = None if side is None else gguf_path(side.source)
    for settings in [s for s in inputs.served if path is not None and s.path == path]:
        inputs.served.pop(settings).close()


def _record_runtime(inputs: RunInputs, req: CertifyRequest, label: str, seq_len: int,
                    record: dict[str, Any]) -> None:
    """A GGUF side evaluated by llama.cpp says so, and how, in its `format` record."""
    settings = _runtime_settings(inputs, req, label, seq_len)
    if settings is not None and record.get("format") is not None:
        from invarlock.models import llamacpp

        record["format"].update(llamacpp.format_fields(settings))


def _device_tag(inputs: RunInputs, req: CertifyRequest, seq_len: int) -> str:
    """The baseline cache key's device: llama.cpp's results also depend on its build and
    settings, so they are part of the key."""
    base = inputs.device.split(":")[0]
    settings = _runtime_settings(inputs, req, "baseline", seq_len)
    if settings is None:
        return base
    from invarlock.models import llamacpp

    return f"{base} {llamacpp.cache_tag(settings)}"


def _unscored(base: Any, kind: MetricKind) -> Any:
    """The subject's results for windows it could not score: every value NaN (broken)."""
    from invarlock.evaluate import WindowScores

    n = len(base.window_ids)
    return WindowScores(kind=kind, window_ids=np.asarray(base.window_ids, dtype=np.int64),
                        sha256=tuple(base.sha256), tokens=np.asarray(base.tokens, dtype=np.int64),
                        values=np.full(n, np.nan), nonfinite_windows=n, seconds=0.0)


def _run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _release_memory() -> None:
    import torch

    from invarlock.models.device import trim_host_memory

    gc.collect()
    trim_host_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _paired(base: Any, subj: Any) -> gate.PairedArrays:
    return gate.PairedArrays(tokens=np.asarray(base.tokens, dtype=np.int64),
                             baseline=np.asarray(base.values, dtype=np.float64),
                             subject=np.asarray(subj.values, dtype=np.float64))


def _match(plan: WindowPlan, base_sets: dict[str, Any], subj_sets: dict[str, Any]) -> float:
    """Share of evaluated windows that both models were fed exactly as planned.

    Each side's hashes come from the tensors its evaluation passed to the forward. A set the
    subject could not read at all (nothing fed, every value broken) holds no numbers to pair.
    """
    from invarlock.evaluate import planned_sha256

    same = total = 0.0
    for name, subj in subj_sets.items():
        if subj is None or (not subj.fed_sha256 and subj.nonfinite_windows == subj.n):
            continue
        windows, base = getattr(plan, name), base_sets[name]
        if not (np.array_equal(base.window_ids, windows.window_ids)
                and np.array_equal(subj.window_ids, windows.window_ids)):
            return 0.0
        planned = planned_sha256(windows)
        total += len(planned)
        same += gate.pairing_match(planned, base.fed_sha256, subj.fed_sha256) * len(planned)
    return same / total if total else 1.0
