"""The certification pipeline: plan windows → baseline (cached) → subject → gate → certificate.

One model is resident at a time: the baseline is evaluated (or its results come from the
cache), then either edited in memory into the subject or dropped before the subject is
loaded. The subject on disk is never written to. The preview set is scored first and a
catastrophic preview stops the run before the final set.
"""

from __future__ import annotations

import gc
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from invarlock import __version__, environment, gate
from invarlock.cache import BaselineCache, CacheKey
from invarlock.certificate import document, markdown
from invarlock.data.corpus import DatasetSource, load_corpus
from invarlock.data.windows import WindowPlan, WindowSet, plan_windows
from invarlock.enums import MetricKind
from invarlock.errors import EvidenceError, InputError
from invarlock.guards import ChainSettings
from invarlock.policy import resolve

log = logging.getLogger(__name__)

SAVED_MODEL_DIR = "model"  # output.save_model: the edited subject goes here, inside out_dir


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
    use_cache: bool = True
    cache_dir: Path | None = None
    progress: bool = False
    edit_impl: Any = None  # an invarlock.edits.Edit to use instead of looking up edit["name"]


@dataclass(frozen=True)
class CertifyOutcome:
    certificate: dict[str, Any]
    path: Path
    markdown_path: Path

    @property
    def verdict(self) -> str:
        return self.certificate["verdict"]["status"]

    def summary(self) -> dict[str, Any]:
        """The `--json` object: the verdict, the one number and where the evidence is."""
        pm = self.certificate["primary_metric"]
        return {
            "verdict": self.verdict,
            "kind": pm["kind"],
            "ratio": pm["ratio"],
            "ratio_ci": pm["ratio_ci"],
            "delta_ci": pm["delta"]["ci"] if pm["delta"] else None,
            "gate_value": pm["gate_value"],
            "basis": pm["basis"],
            "limit": pm["limit"],
            "catastrophic": pm["catastrophic"],
            "reasons": self.certificate["verdict"]["reasons"],
            "guards": {name: {"mode": g["mode"], "passed": g["passed"]}
                       for name, g in self.certificate["guards"].items()},
            "run_id": self.certificate["run_id"],
            "certificate": str(self.path),
            "markdown": str(self.markdown_path),
        }


@dataclass
class _Timer:
    spans: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.spans[name] = round(self.spans.get(name, 0.0) + time.perf_counter() - start, 4)


def certify(req: CertifyRequest) -> CertifyOutcome:
    """Run one certification and write its certificate; the verdict is in the outcome."""
    from invarlock import evaluate
    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.run import GuardRun, head, run_info
    from invarlock.models import device as devices
    from invarlock.models import loading, source, tokenizer

    started = time.perf_counter()
    timer = _Timer()
    run_id = _run_id()
    device = devices.resolve_device(req.device)

    t = time.perf_counter()
    base_src = source.resolve_model_source(req.baseline, revision=req.revision)
    base_cfg = source.read_config(base_src)
    adapter = source.detect_adapter(base_cfg, req.adapter)
    kind = adapter.metric
    subj_src = None
    if req.subject is not None:
        subj_src = source.resolve_model_source(req.subject, revision=req.revision)
        subj_adapter = source.detect_adapter(source.read_config(subj_src), req.adapter)
        if subj_adapter is not adapter:
            raise InputError(f"baseline is {adapter} but subject is {subj_adapter}: "
                             "they must be the same kind of model")
    policy = resolve(req.config, context_length=source.context_length(base_cfg))
    chain = ChainSettings.from_policy(policy.values.get("guards"))  # bad guard config: fail now
    _seed_everything(policy.windows.seed)

    base_tok = loading.load_tokenizer(base_src)
    tok_hash = tokenizer.tokenizer_hash(base_tok)
    if subj_src is not None:
        subj_tok = loading.load_tokenizer(subj_src)
        if tokenizer.tokenizer_hash(subj_tok) != tok_hash:
            diffs = tokenizer.tokenizer_differences(base_tok, subj_tok)
            raise EvidenceError("baseline and subject tokenizers differ: " + "; ".join(diffs))
        del subj_tok
    timer.add("resolve_s", t)

    t = time.perf_counter()
    corpus = load_corpus(req.dataset, labelled=kind is MetricKind.ACCURACY)
    wp = policy.windows
    plan = plan_windows(corpus, base_tok, kind=kind, seq_len=wp.seq_len, stride=wp.stride,
                        preview_n=wp.preview_n, final_n=wp.final_n, seed=wp.seed,
                        strict=wp.strict, tokenizer_hash=tok_hash)
    timer.add("windows_s", t)

    def score(model: Any, windows: WindowSet, label: str, taps: Any = None) -> Any:
        t0 = time.perf_counter()
        scores = evaluate.evaluate_windows(model, windows, kind=kind, device=device,
                                           batch_size=req.batch_size, taps=taps or None,
                                           progress=req.progress)
        timer.add(f"{label}_eval_s", t0)
        return scores

    guards = GuardRun(chain, policy.values.get("guards") or {},
                      run_info(kind, device, plan, chain, policy))

    # Baseline: from the cache when this exact evaluation was done before.
    base_files = source.weight_files(base_src, req.allow_pickle)
    dtype = devices.resolve_dtype(req.dtype, device, devices.checkpoint_dtype(base_cfg))
    key = CacheKey(source.weights_digest(base_files), tok_hash, plan.digest, str(kind),
                   str(dtype).removeprefix("torch."), device.split(":")[0], __version__)
    cache = BaselineCache(req.cache_dir) if req.use_cache else None
    payload = cache.load(key) if cache else None
    cached = _from_payload(payload)
    if cached is not None and not guards.restore(payload.get("guards")):
        log.info("baseline cache entry lacks these guard settings; evaluating the baseline")
        cached = None
    base_from_cache = cached is not None
    base_model = None
    if cached is not None:
        base_sets, base_parameters = cached
    else:
        t = time.perf_counter()
        base_model = loading.load_model(base_src, adapter=adapter, device=device,
                                        dtype=req.dtype, allow_pickle=req.allow_pickle,
                                        **_placement(req))
        timer.add("load_s", t)
        with loading.weights_on_host(base_model.model):
            guards.baseline_loaded(base_model.model)
        base_sets = {name: score(base_model.model, getattr(plan, name), "baseline",
                                 guards.taps(base_model.model, "baseline", name))
                     for name in ("preview", "final")}
        broken = sum(s.nonfinite_windows for s in base_sets.values())
        if broken:
            raise EvidenceError(f"the baseline produced non-finite losses on {broken} windows; "
                                "there is nothing sound to compare the subject with")
        base_parameters = int(base_model.parameters)
        guard_payload = guards.baseline_done()
        if cache:
            cache.store(key, {**_to_payload(base_sets, base_parameters),
                              "guards": guard_payload})
    base_record = _model_record(base_src, base_cfg, adapter, key.weights_digest, "files",
                                dtype=key.dtype, parameters=base_parameters,
                                from_cache=base_from_cache)

    # Subject: the baseline edited in memory, or a checkpoint loaded after the baseline left.
    edit_record = None
    t = time.perf_counter()
    if req.edit is not None:
        from invarlock.edits import get_edit

        edit = req.edit_impl or get_edit(req.edit["name"])
        edit_plan = edit.parse_plan(req.edit)
        if base_model is None:
            base_model = loading.load_model(base_src, adapter=adapter, device=device,
                                            dtype=req.dtype, allow_pickle=req.allow_pickle,
                                        **_placement(req))
        subject = base_model
        if loading.has_offloaded_weights(subject.model):
            raise InputError("the edit cannot change weights offloaded by the device map; "
                             "raise --max-memory, or certify a saved subject with --subject")
        t_edit = time.perf_counter()
        result = edit.apply(subject.model, edit_plan)
        timer.add("edit_s", t_edit)
        edit_record = {"name": result.name, "plan": result.plan,
                       "modules_changed": list(result.modules_changed),
                       "params_changed": int(result.params_changed),
                       "max_abs_error": float(result.max_abs_error)}
        subj_record = _model_record(base_src, base_cfg, adapter, loading.tensor_digest(
            subject.model), "tensors", dtype=key.dtype, parameters=subject.parameters,
            produced_by=f"edit:{result.name}")
        subj_record["kind"] = "edit"
    else:
        assert subj_src is not None
        del base_model
        base_model = None
        _release_memory()
        subject = loading.load_model(subj_src, adapter=adapter, device=device, dtype=req.dtype,
                                     allow_pickle=req.allow_pickle,
                                        **_placement(req))
        subj_record = _model_record(subj_src, subject.config, adapter, subject.weights_digest,
                                    "files", dtype=str(subject.dtype).removeprefix("torch."),
                                    parameters=subject.parameters)
    timer.add("load_s", t)

    ctx = SubjectContext(
        info=guards.info, model=subject.model, config=subject.config, baseline_config=base_cfg,
        baseline_files=base_files, tokenizer_hashes=(tok_hash, tok_hash),
        fingerprint=subj_record["weights_digest"] if req.edit is not None else None,
        calibration=head(plan.final, int(guards.info.calibration_ids.size)),
        score=lambda model, windows: evaluate.evaluate_windows(
            model, windows, kind=kind, device=device, batch_size=req.batch_size),
        base_model_prefix=str(getattr(subject.model, "base_model_prefix", "") or ""))
    with loading.weights_on_host(subject.model):
        intact = guards.subject_loaded(ctx)

    subj_prev = score(subject.model, plan.preview, "subject",
                      guards.taps(subject.model, "subject", "preview"))
    preview = _paired(base_sets["preview"], subj_prev)
    catastrophic = gate.is_catastrophic(kind, gate.summarize(kind, preview),
                                        policy.primary_metric)
    subj_fin = None
    if catastrophic:
        log.warning("preview ratio beyond the catastrophic limit: final set not evaluated")
    elif not intact:
        log.warning("%s failed before evaluation (fatal): final set not evaluated",
                    guards.fatal)
    else:
        subj_fin = score(subject.model, plan.final, "subject",
                         guards.taps(subject.model, "subject", "final"))
    final = _paired(base_sets["final"], subj_fin) if subj_fin is not None else None
    ctx.scores = {"preview": subj_prev, "final": subj_fin}
    with loading.weights_on_host(subject.model):
        outcomes = guards.finish(ctx)
    timer.spans.update(guards.timings())

    match = _match(base_sets, {"preview": subj_prev, "final": subj_fin})
    if match < 1.0:
        raise EvidenceError(f"pairing broken: only {match:.2%} of windows were identical for "
                            "both models")
    pm = gate.primary_metric(kind, preview, final, policy.primary_metric, policy.bootstrap)
    checks = [gate.pairing_check(match, plan.overlap(), plan.preview.n, plan.final.n),
              *gate.primary_checks(pm, policy.primary_metric),
              *(o.check for o in outcomes)]
    decision = gate.decide(checks, [*gate.PRIMARY_GATING, *guards.gating(outcomes)])

    ve_written = None
    if req.write_ve_subject is not None:
        ve_written = _write_ve_subject(guards, subject, req.write_ve_subject)

    out_dir = req.out_dir if req.out_dir is not None else Path("runs") / run_id
    save_to = req.save_subject or (out_dir / SAVED_MODEL_DIR if req.save_model else None)
    saved = None
    if save_to is not None:
        if decision.verdict == "PASS":
            loading.save_checkpoint(subject, save_to)
            saved = str(save_to)
        else:
            log.warning("verdict FAIL: the edited subject is discarded, nothing saved to %s",
                        save_to)
    del subject
    _release_memory()

    timer.spans["total_s"] = round(time.perf_counter() - started, 4)
    cert = {
        "format": "invarlock.certificate",
        "schema_version": 1,
        "run_id": run_id,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": {"name": "invarlock", "version": __version__},
        "environment": _environment(devices.describe_device(device), base_cfg, req),
        "seeds": {"windows": wp.seed, "bootstrap": policy.bootstrap.seed, "torch": wp.seed,
                  "numpy": wp.seed, "python": wp.seed},
        "baseline": base_record,
        "subject": subj_record,
        "tokenizer": {"hash": tok_hash, "class": type(base_tok).__name__,
                      "vocab_size": len(base_tok), "identical": True},
        "dataset": {"spec": corpus.source.spec(), "provider": corpus.source.provider,
                    "digest": corpus.digest, "documents": len(corpus.documents),
                    "tokens": int(plan.total_tokens)},
        "windows": _windows_section(plan, base_sets, {"preview": subj_prev, "final": subj_fin}),
        "pairing": {"match": match, "overlap": plan.overlap(), "preview_n": plan.preview.n,
                    "final_n": plan.final.n, "final_evaluated": subj_fin is not None},
        "edit": edit_record,
        "primary_metric": pm.as_dict(),
        "policy": policy.as_dict(),
        "guards": {o.name: o.section for o in outcomes},
        "validation": decision.validation,
        "gating": list(decision.gating),
        "verdict": decision.verdict_section(),
        "artifacts": {"markdown": document.MARKDOWN_FILENAME, "saved_subject": saved,
                      "ve_subject": ve_written},
        "timings": timer.spans,
    }
    sealed = document.seal(cert)
    path = document.write_certificate(sealed, out_dir, markdown.render(sealed))
    return CertifyOutcome(sealed, path, out_dir / document.MARKDOWN_FILENAME)


def _placement(req: CertifyRequest) -> dict[str, Any]:
    """Device-map arguments for load_model (none without --device-map)."""
    if req.device_map is None:
        return {}
    return {"device_map": req.device_map, "max_memory": req.max_memory}


def _write_ve_subject(guards: Any, subject: Any, out_dir: Path) -> str | None:
    """Write the VE-corrected copy requested with --write-ve-subject (the subject stays)."""
    from invarlock.guards.measure.variance import write_corrected_copy

    probe = guards.probes.get("variance")
    if probe is None or guards.fatal is not None:
        log.warning("no VE-corrected subject written: the variance guard did not run")
        return None
    write_corrected_copy(subject, probe.scales, out_dir)
    return str(out_dir)
def _environment(device: dict[str, Any], config: dict[str, Any],
                 req: CertifyRequest) -> dict[str, Any]:
    """Where the run happened; plugin distributions that loaded or edited a model included."""
    from invarlock import plugins

    described = environment.describe(device)
    edit_name = req.edit.get("name") if req.edit else None
    described["libraries"].update(plugins.distributions_in_use(config, req.adapter, edit_name))
    return described


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

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_record(src: Any, config: dict[str, Any], adapter: Any, digest: str, basis: str, *,
                  dtype: str, parameters: int, from_cache: bool = False,
                  produced_by: str | None = None) -> dict[str, Any]:
    archs = config.get("architectures") or ["unknown"]
    return {
        "source": src.spec, "kind": src.kind,
        "path": str(src.path) if src.path else None, "revision": src.revision,
        "adapter": str(adapter), "architecture": str(archs[0]),
        "model_type": str(config.get("model_type", "unknown")), "dtype": dtype,
        "parameters": int(parameters), "weights_digest": digest, "digest_basis": basis,
        "results_from_cache": from_cache, "produced_by": produced_by,
    }


def _paired(base: Any, subj: Any) -> gate.PairedArrays:
    return gate.PairedArrays(tokens=np.asarray(base.tokens, dtype=np.int64),
                             baseline=np.asarray(base.values, dtype=np.float64),
                             subject=np.asarray(subj.values, dtype=np.float64))


def _match(base_sets: dict[str, Any], subj_sets: dict[str, Any]) -> float:
    """Share of evaluated windows whose token hashes agree between the two models."""
    same = total = 0
    for name, subj in subj_sets.items():
        if subj is None:
            continue
        base = base_sets[name]
        total += len(subj.sha256)
        same += sum(a == b for a, b in zip(base.sha256, subj.sha256, strict=True))
        if not np.array_equal(base.window_ids, subj.window_ids):
            return 0.0
    return same / total if total else 0.0


def _windows_section(plan: WindowPlan, base_sets: dict[str, Any],
                     subj_sets: dict[str, Any]) -> dict[str, Any]:
    def one(name: str) -> dict[str, Any]:
        windows: WindowSet = getattr(plan, name)
        base, subj = base_sets[name], subj_sets[name]
        return {
            "ids": [int(i) for i in windows.window_ids],
            "sha256": list(windows.sha256),
            "tokens": [int(n) for n in base.tokens],
            "baseline": [float(v) for v in base.values],
            "subject": [] if subj is None else [
                float(v) if np.isfinite(v) else None for v in subj.values],
        }

    return {
        "kind": str(plan.kind), "seq_len": plan.seq_len, "stride": plan.stride,
        "seed": plan.seed, "available": int(plan.available),
        "duplicates_dropped": int(plan.duplicates_dropped),
        "requested": {"preview_n": plan.requested[0], "final_n": plan.requested[1]},
        "plan_digest": plan.digest, "preview": one("preview"), "final": one("final"),
    }


@dataclass(frozen=True)
class _CachedScores:
    """Baseline results as read back from the cache (the fields the pipeline uses)."""

    window_ids: np.ndarray
    sha256: tuple[str, ...]
    tokens: np.ndarray
    values: np.ndarray
    nonfinite_windows: int = 0


def _to_payload(sets: dict[str, Any], parameters: int) -> dict[str, Any]:
    return {"parameters": parameters,
            "sets": {name: {"window_ids": [int(i) for i in s.window_ids],
                            "sha256": list(s.sha256), "tokens": [int(n) for n in s.tokens],
                            "values": [float(v) for v in s.values]}
                     for name, s in sets.items()}}


def _from_payload(payload: dict[str, Any] | None,
                  ) -> tuple[dict[str, _CachedScores], int] | None:
    if payload is None:
        return None
    try:
        sets = {name: _CachedScores(np.asarray(p["window_ids"], dtype=np.int64),
                                    tuple(p["sha256"]),
                                    np.asarray(p["tokens"], dtype=np.int64),
                                    np.asarray(p["values"], dtype=np.float64))
                for name in ("preview", "final") for p in [payload["sets"][name]]}
        return sets, int(payload["parameters"])
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring malformed baseline cache entry")
        return None
