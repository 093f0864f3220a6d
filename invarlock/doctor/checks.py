"""The individual preflight checks; each appends findings to a `DoctorResult`.

Order matters: configuration first (nothing else is meaningful without it), then models as
metadata, then what needs the hf extra (tokenizers, windows, device).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator

from invarlock.config import describe_error, get, load_yaml, merge_sources
from invarlock.config_schema import CONFIG_SCHEMA
from invarlock.errors import ConfigError, EvidenceError, InvarlockError
from invarlock.network import NETWORK_ENV, network_allowed

if TYPE_CHECKING:
    from invarlock.doctor import DoctorResult
    from invarlock.doctor.metadata import CheckpointTensors
    from invarlock.policy import ResolvedPolicy

log = logging.getLogger(__name__)

_VALIDATOR = Draft202012Validator(CONFIG_SCHEMA)
MEMORY_MARGIN = 1.2  # weights plus activations, buffers and allocator slack
TIGHT_SHARE = 0.7  # above this share of free memory the run may still fit, but barely
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def network(result: DoctorResult) -> None:
    if network_allowed():
        result.add("D051", f"network access allowed ({NETWORK_ENV}=1): hub models and "
                           "datasets may be downloaded")
    else:
        result.add("D050", "network access is off: hub models and datasets are read from the "
                           "local cache only", hint=f"set {NETWORK_ENV}=1 to allow downloads")


# --- configuration --------------------------------------------------------------------------

def configuration(result: DoctorResult, paths: list[str | Path],
                  flags: dict[str, Any]) -> dict[str, Any] | None:
    """Load, validate and merge the config files and flags; resolve the policy."""
    from invarlock.policy import resolve
    from invarlock.run_config import finalize, flags_to_config

    sources: list[tuple[str, dict[str, Any]]] = []
    for path in paths:
        try:
            data = load_yaml(path)
        except ConfigError as exc:
            result.add("D001", str(exc))
            continue
        errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
        for error in errors:
            result.add("D002", f"{path}: {describe_error(error)}")
        sources.append((str(path), data))
    try:
        sources.append(("command line", flags_to_config(flags)))
    except InvarlockError as exc:
        result.add("D030", str(exc))
    if not result.ok:
        return None
    try:
        merged = merge_sources(sources)
    except ConfigError as exc:
        result.add("D002", str(exc))
        return None
    try:
        resolve(merged)
    except ConfigError as exc:
        result.add("D003", str(exc))
        return None
    try:
        config = finalize(sources)
    except InvarlockError as exc:
        result.add("D004", str(exc))
        return None
    except ImportError as exc:  # the bundled demo is not part of this installation
        result.add("D004", f"the bundled demo is not available here ({exc})",
                   hint="pass --baseline and --dataset")
        return None
    return config


# --- models, tokenizers, windows, device ----------------------------------------------------

def run_setup(result: DoctorResult, config: dict[str, Any]) -> None:
    from invarlock.policy import resolve

    base = _model(result, "baseline", get(config, "model.id", "demo"), config, "D010")
    subject = None
    specs = get(config, "model.subject") or []
    for spec in [specs] if isinstance(specs, str) else specs:  # one subject, or several
        subject = _model(result, "subject", spec, config, "D011")
        if base is not None and subject is not None:
            _compare_models(result, base, subject)
    policy = None
    try:
        from invarlock.models.source import context_length

        policy = resolve(config, context_length=context_length(base["config"]) if base else None)
    except ConfigError as exc:
        result.add("D034" if "context length" in str(exc) else "D003", str(exc))
    if policy is not None:
        _policy_note(result, policy)
    missing = missing_hf_modules()
    if missing:
        result.add("D060", f"{' and '.join(missing)} not installed: certify and run cannot work "
                           "here; tokenizer, window and device checks were skipped",
                   hint='pip install "invarlock[hf]"')
        return
    if base is None or policy is None:
        return
    tokenizer = _tokenizers(result, base, subject)
    if tokenizer is not None:
        _windows(result, config, policy, base, tokenizer)
    _device(result, config, base, subject)


def missing_hf_modules() -> list[str]:
    """The modules of the hf extra that certify needs and this environment lacks."""
    return [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]


def _model(result: DoctorResult, role: str, spec: str, config: dict[str, Any],
           code: str) -> dict[str, Any] | None:
    """Resolve one model and read its metadata; None when it cannot be used."""
    from invarlock.doctor.metadata import checkpoint_tensors
    from invarlock.models import source

    allow_pickle = bool(get(config, "model.allow_pickle", False))
    try:
        src = source.resolve_model_source(spec, revision=get(config, "model.revision"),
                                          allow_pickle=allow_pickle,
                                          gguf_file=get(config, "model.gguf_file"))
        cfg = source.read_config(src)
        _check_format(src, cfg, config)
    except InvarlockError as exc:
        result.add(code, f"{role}: {exc}")
        return None
    except ImportError as exc:
        result.add(code, f"{role}: {spec} cannot be resolved without the hf extra ({exc})",
                   hint='pip install "invarlock[hf]"')
        return None
    try:
        adapter = source.detect_adapter(cfg, get(config, "model.adapter", "auto"))
    except InvarlockError as exc:
        result.add("D012", f"{role}: {exc}")
        return None
    try:
        files = source.weight_files(src, allow_pickle)
    except InvarlockError as exc:
        result.add("D013", f"{role}: {exc}")
        return None
    try:
        tensors = checkpoint_tensors(files)
    except InvarlockError as exc:
        result.add("D014", f"{role}: {exc}")
        return None
    weight_bytes = sum(p.stat().st_size for p in files if p.suffix != ".json")
    params = tensors.parameters if tensors.tensors else None
    archs = cfg.get("architectures") or ["unknown"]
    shown = f"{params:,} parameters" if params is not None else "parameters not read (pickle)"
    if src.gguf_file:
        from invarlock.models.gguf_file import gguf_info

        shown = f"GGUF file {src.gguf_file} ({gguf_info(files[0]).file_type})"
    result.add("D018", f"{role} {spec}: {archs[0]} ({cfg.get('model_type', '?')}), adapter "
                       f"{adapter}, {shown}, {weight_bytes / 2**20:,.1f} MiB of weights")
    record = {"source": spec, "path": str(src.path) if src.path else None,
              "architecture": str(archs[0]), "model_type": cfg.get("model_type"),
              "adapter": str(adapter), "parameters": params, "weight_bytes": weight_bytes,
              "dtypes": list(tensors.dtypes)}
    result.resolution[role] = record
    return {"source": src, "config": cfg, "adapter": adapter, "tensors": tensors,
            "record": record}


def _check_format(src: Any, cfg: dict[str, Any], config: dict[str, Any]) -> None:
    """A quantized checkpoint's backend is installed and has kernels for the device."""
    from invarlock.models import formats

    if not formats.is_quantized(cfg):
        return
    try:
        from invarlock.models.device import resolve_device

        device = resolve_device(get(config, "model.device", "auto"))
    except Exception:  # no torch here: the hf check reports that
        device = "cpu"
    formats.check_loadable(src, cfg, device, bool(get(config, "model.dequantize", False)))


def _compare_models(result: DoctorResult, base: dict[str, Any], subj: dict[str, Any]) -> None:
    from invarlock.doctor.metadata import config_differences, shape_differences

    if base["adapter"] is not subj["adapter"]:
        result.add("D012", f"baseline is {base['adapter']} but subject is {subj['adapter']}: "
                           "they must be the same kind of model")
    b, s = base["record"], subj["record"]
    if (b["architecture"], b["model_type"]) != (s["architecture"], s["model_type"]):
        result.add("D015", f"architecture {b['architecture']} ({b['model_type']}) vs "
                           f"{s['architecture']} ({s['model_type']})")
    bt: CheckpointTensors = base["tensors"]
    st: CheckpointTensors = subj["tensors"]
    if bt.tensors and st.tensors:
        lines = shape_differences(bt, st)
        if lines:
            result.add("D016", "; ".join(lines))
        if bt.dtypes != st.dtypes:
            result.add("D019", f"weights stored as {', '.join(bt.dtypes)} (baseline) vs "
                               f"{', '.join(st.dtypes)} (subject); both are evaluated in the "
                               "run's compute dtype")
    from invarlock.models.formats import comparable_configs

    lines = config_differences(*comparable_configs(base["source"], base["config"],
                                                   subj["source"], subj["config"]))
    if lines:
        result.add("D017", "config.json differs: " + "; ".join(lines))


def _policy_note(result: DoctorResult, policy: ResolvedPolicy) -> None:
    w, b = policy.windows, policy.bootstrap
    result.policy = policy.as_dict()
    overrides = ", ".join(policy.overrides) or "none"
    result.add("D005", f"policy {policy.tier}/{policy.profile}: {w.preview_n}+{w.final_n} "
                       f"windows of {w.seq_len} tokens ({'strict' if w.strict else 'may shrink'}"
                       f"), {b.replicates} bootstrap replicates, overrides: {overrides}, "
                       f"digest {policy.digest}")


def _tokenizers(result: DoctorResult, base: dict[str, Any],
                subj: dict[str, Any] | None) -> Any:
    from invarlock.models import loading, tokenizer

    try:
        base_tok = loading.load_tokenizer(base["source"])
    except InvarlockError as exc:
        result.add("D020", f"baseline: {exc}")
        return None
    if subj is not None:
        from invarlock.errors import EvidenceError
        from invarlock.models.tokenizer import check_subject_tokenizer

        try:
            check_subject_tokenizer(base_tok, tokenizer.tokenizer_hash(base_tok), subj["source"])
        except EvidenceError as exc:
            result.add("D021", str(exc))
        except InvarlockError as exc:
            result.add("D020", f"subject: {exc}")
    return base_tok


def _windows(result: DoctorResult, config: dict[str, Any], policy: ResolvedPolicy,
             base: dict[str, Any], tok: Any) -> None:
    from invarlock.data.corpus import dataset_source_from_config, load_corpus
    from invarlock.data.windows import plan_windows
    from invarlock.enums import MetricKind
    from invarlock.models.tokenizer import tokenizer_hash

    kind = base["adapter"].metric
    try:
        source = dataset_source_from_config(config.get("dataset") or {})
        corpus = load_corpus(source, labelled=kind is MetricKind.ACCURACY)
    except InvarlockError as exc:
        result.add("D030", str(exc))
        return
    w = policy.windows
    try:
        plan = plan_windows(corpus, tok, kind=kind, seq_len=w.seq_len, stride=w.stride,
                            preview_n=w.preview_n, final_n=w.final_n, seed=w.seed,
                            strict=w.strict, tokenizer_hash=tokenizer_hash(tok),
                            profile=policy.profile)
    except EvidenceError as exc:
        result.add("D031", str(exc), hint="use a larger corpus, fewer or shorter windows, or "
                                          "the dev profile")
        return
    except InvarlockError as exc:
        result.add("D030", str(exc))
        return
    if plan.shrunk:
        result.add("D032", f"only {plan.available} unique windows for {w.preview_n}+"
                           f"{w.final_n} requested: both sets shrink to {plan.preview.n}")
    result.add("D033", f"dataset {source.spec()}: {len(corpus.documents):,} documents, "
                       f"{plan.total_tokens:,} tokens, {plan.available} unique windows "
                       f"({plan.duplicates_dropped} duplicates dropped); preview "
                       f"{plan.preview.n} + final {plan.final.n}")
    result.resolution["windows"] = {"available": plan.available, "preview_n": plan.preview.n,
                                    "final_n": plan.final.n, "plan_digest": plan.digest}


def _device(result: DoctorResult, config: dict[str, Any], base: dict[str, Any],
            subj: dict[str, Any] | None) -> None:
    from invarlock.models import device as devices

    requested = get(config, "model.device", "auto")
    try:
        device = devices.resolve_device(requested)
    except InvarlockError as exc:
        result.add("D040", str(exc))
        return
    dtype = devices.resolve_dtype(get(config, "model.dtype", "auto"), device,
                                  devices.checkpoint_dtype(base["config"]))
    dtype_name = str(dtype).removeprefix("torch.")
    result.resolution["device"] = {"device": device, "dtype": dtype_name}
    # One model is resident at a time (the baseline leaves before the subject loads).
    sizes = [m["record"]["parameters"] or m["record"]["weight_bytes"] // 4
             for m in (base, subj) if m is not None]
    need = int(max(sizes) * _DTYPE_BYTES.get(dtype_name, 4) * MEMORY_MARGIN)
    free = free_memory(device)
    result.resolution["device"].update({"memory_needed": need, "memory_free": free})
    shown = (f"needs about {_size(need)}" if free is None else
             f"needs about {_size(need)}, {_size(free)} free on {device}")
    result.add("D041", f"device {device} (requested {requested}), compute dtype {dtype_name}; "
                       f"the model {shown}")
    if free is None:
        return
    if need > free:
        result.add("D042", f"the model {shown}", hint="use a smaller dtype or another device")
    elif need > TIGHT_SHARE * free:
        result.add("D043", f"the model {shown}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_memory(device: str) -> int | None:
    """Bytes free on the device: CUDA from the driver, otherwise available system memory."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
