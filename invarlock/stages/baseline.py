"""Stage 3: the baseline's results on the windows the decision needs, from the cache when
this evaluation was done before, and how the baseline keeps pace with the subject (lockstep
beside it, or scored in blocks and let go first: `invarlock.baseline_run`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from invarlock import __version__, baseline_run, sequential_run
from invarlock.cache import BaselineCache, CacheKey, scores_from_payload, scores_to_payload
from invarlock.certificate import build
from invarlock.data.windows import WindowSet
from invarlock.errors import EvidenceError
from invarlock.stages import alternate, common
from invarlock.stages.common import guard_run, guard_taps, placement, release_memory, run_design
from invarlock.stages.records import (
    WINDOW_SETS,
    BaselineEvidence,
    CertifyRequest,
    EvaluationPlan,
    RunInputs,
    Timer,
)
from invarlock.stages.served import (
    close_served,
    device_tag,
    distribution_k,
    record_runtime,
    runtime_settings,
)

log = logging.getLogger(__name__)


def evaluate_baseline(inputs: RunInputs, plan: EvaluationPlan, req: CertifyRequest,
                      timer: Timer) -> tuple[BaselineEvidence, Any]:
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
                   device_tag(inputs, req, plan.windows.seq_len), __version__)
    design = run_design(inputs, plan)
    need = {"preview": sequential_run.preview_needed(design, plan.windows.preview.n),
            "final": sequential_run.final_needed_first(design, plan.windows.final.n)}
    guards = guard_run(inputs, plan)
    cache = (BaselineCache(req.cache_dir, secret=req.cache_secret,
                           namespace=req.cache_namespace) if req.use_cache else None)
    hit = cache.load(key) if cache else None
    top_k = distribution_k(inputs, req, plan.windows.seq_len)
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
        sets = {name: common.score(
                    inputs, req, timer, model.model,
                    sequential_run.evaluated(getattr(plan.windows, name), need[name]),
                    "baseline", guard_taps(guards, model.model, "baseline", name), top_k)
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
    record_runtime(inputs, req, "baseline", plan.windows.seq_len, record)

    def stored(current: dict[str, Any]) -> None:
        """The cache entry rewritten with every window scored so far (a later subject
        finds them there); the certificate records the digest of the entry it rests on."""
        if cache:
            record["cache_payload_digest"] = cache.store(
                key, {**scores_to_payload(current, parameters), "guards": guard_payload})

    record["cache_payload_digest"] = cache_digest
    record["final_blocks"] = [] if cached is not None else [[0, need["final"]]]
    scores = baseline_run.BaselineScores(plan.windows, sets, score=resident.score,
                                         stored=stored, blocks=record["final_blocks"])
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

    def __init__(self, inputs: RunInputs, req: CertifyRequest, timer: Timer,
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
                                            tokenizer=self.inputs.tokenizer, **placement(req))
            self.timer.add("load_s", t)
            with loading.weights_on_host(self.model.model):
                check_baseline_weights(self.model.model)
        return self.model

    def score(self, windows: WindowSet) -> Any:
        """The baseline's results on `windows` (no guard taps: the guards' windows are
        among the first ones, scored before any subject)."""
        model = self.load()
        return common.score(self.inputs, self.req, self.timer, model.model, windows, "baseline",
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
        close_served(self.inputs, "baseline")
        return model

    def release(self) -> None:
        if self.take() is not None:
            release_memory()


def check_baseline_weights(model: Any) -> None:
    """A baseline with NaN or Inf weights is no reference: stop before measuring anything."""
    from invarlock.models.health import nonfinite_parameters

    bad = nonfinite_parameters(model)
    if bad:
        raise EvidenceError(f"the baseline has non-finite weights in {len(bad)} tensor(s) "
                            f"(first: {bad[0]}); there is nothing sound to compare the subject "
                            "with")


def settle_baseline(inputs: RunInputs, plan: EvaluationPlan, req: CertifyRequest,
                    baseline: BaselineEvidence) -> Any:
    """Choose how the baseline keeps pace with the subject (`baseline_run.schedule`).

    Lockstep keeps the baseline model resident beside the subject, scoring each look's block
    on demand (an in-memory edit then gets its own copy). Blocks lets the model go before
    the subject loads, holding the final windows up to the first look; a later look past
    them swaps the models for the next, doubled block (`stages.alternate`). Where the
    subject cannot be let go and brought back exactly, or no design may stop early, the
    baseline scores the rest of the plan now instead. The model is returned (for an edit to
    consume) instead of dropped. Returns the model handed to `prepare_subject`, or None."""
    resident = baseline.resident
    schedule = _schedule(inputs, req, plan, resident)
    baseline.record["schedule"] = schedule.value
    log.info("baseline schedule: %s", schedule.value)
    if schedule is baseline_run.Schedule.LOCKSTEP:
        baseline.record["schedule_note"] = ("both models resident: the baseline scores each "
                                            "look's windows just before the subject")
        return None
    design = run_design(inputs, plan)
    why = ("no sequential design: the plan is scored whole" if design is None
           else alternate.obstacle(inputs, req, plan.windows.seq_len))
    if why is None:
        ends = baseline_run.block_ends(design.looks)
        baseline.scores.ends = ends
        baseline.record["schedule_note"] = (
            "one model resident at a time: the baseline's final blocks end at "
            f"{', '.join(map(str, ends))} windows, each swapped in as a look needs it")
    else:
        baseline.record["schedule_note"] = ("one model resident at a time, the whole plan "
                                            f"scored ahead: {why}")
    for name in WINDOW_SETS:
        baseline.scores.upto(name, _needed(design, plan, name, whole=why is not None))
    model = resident.take()
    if inputs.edit is None and model is not None:
        model = None  # one model resident at a time: the baseline leaves first
        release_memory()
    return model


def _needed(design: Any, plan: EvaluationPlan, name: str, *, whole: bool) -> int:
    """Windows of set `name` the baseline scores before the subject loads: the design's cut
    of the preview; the final windows up to the first look, or all of them (`whole`, always
    when there is no design)."""
    if name == "final":
        return plan.windows.final.n if whole else design.looks[0]
    return sequential_run.preview_needed(design, plan.windows.preview.n)


def _schedule(inputs: RunInputs, req: CertifyRequest, plan: EvaluationPlan,
              resident: _ResidentBaseline) -> baseline_run.Schedule:
    """Lockstep when a design may stop early and a second model fits the memory budget
    beside the first (or two fit, when the cache spared loading the baseline); blocks for a
    device map, and when llama.cpp serves a side (its models are opened per side)."""
    from invarlock.models import device as devices

    if run_design(inputs, plan) is None:
        return baseline_run.Schedule.BLOCKS  # nothing to save: the plan is scored anyway
    seq_len = plan.windows.seq_len
    served = any(runtime_settings(inputs, req, side, seq_len) is not None
                 for side in ("baseline", "subject"))
    one = resident.model_bytes()
    needed = one if resident.model is not None else 2 * one
    return baseline_run.schedule(needed, devices.free_memory(inputs.device),
                                 placed=req.device_map is not None or served)


def _weights_on_host(model: Any) -> Any:
    from invarlock.models import loading

    return loading.weights_on_host(model)
