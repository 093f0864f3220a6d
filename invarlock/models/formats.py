"""Checkpoint formats around the pipeline: how to load one, its tokenizer, what to compare.

Float safetensors checkpoints need none of this. A GGUF file is loaded dequantized by
transformers (its config comes from the file's metadata, which states only some keys); a
Hugging Face quantized folder is loaded with its method's backend, placed on the device while
loading, and optionally dequantized (`--dequantize`). The certificate's `format` record of
each model is made here.
"""

from __future__ import annotations

import logging
from typing import Any

from invarlock.errors import InputError
from invarlock.models import quantized
from invarlock.models.source import ModelSource, gguf_path

logger = logging.getLogger(__name__)

TOKENIZER_FOLDER = "folder"        # tokenizer files next to the GGUF file
TOKENIZER_GGUF = "gguf"            # the tokenizer embedded in the GGUF file (converted)
TOKENIZER_BASELINE = "baseline"    # the GGUF carries none: the baseline's is used
TOKENIZER_CHECKPOINT = "checkpoint"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_quantized(config: dict[str, Any]) -> bool:
    """A Hugging Face checkpoint stored with a quantization method (GGUF excluded)."""
    return quantized.method_of(config) not in (None, "gguf")


def load_kwargs(source: ModelSource, config: dict[str, Any], device: str,
                pickled: bool) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for the source's format."""
    path = gguf_path(source)
    if path is not None:
        from invarlock.models.gguf_file import config_object

        return {"gguf_file": path.name, "config": config_object(config)}
    if is_quantized(config):
        return {"use_safetensors": not pickled, "device_map": device}
    return {"use_safetensors": not pickled}


def dequantize_(model: Any) -> None:
    from invarlock.models.effective import dequantize_modules_

    replaced = dequantize_modules_(model)
    logger.info("dequantized %d quantized module(s) to float for evaluation", len(replaced))


def check_loadable(source: ModelSource, config: dict[str, Any], device: str,
                   dequantize: bool) -> None:
    """Before anything heavy: a declared quantization is held by the weights, and its
    backend is here and can run on the device (see quantized)."""
    if is_quantized(config):
        from invarlock.models.source import weight_files

        try:
            files = weight_files(source, allow_pickle=True)
        except InputError:
            files = []  # no weights: loading says so in its own words
        quantized.check_claim(config, files, source.spec)
    quantized.check_runnable(config, device, dequantize, source.spec)


def check_flags_apply(models: list[tuple[ModelSource, dict[str, Any]]], gguf_file: str | None,
                      dequantize: bool) -> None:
    """`--gguf-file` and `--dequantize` must apply to one of the models compared (source and
    config of each): a flag that silently does nothing leaves the user believing it did."""
    if gguf_file and not any(src.gguf_file for src, _ in models):
        raise InputError(f"--gguf-file {gguf_file} does nothing: no model folder given holds a "
                         "GGUF file of that name")
    if dequantize and not any(is_quantized(config) for _, config in models):
        raise InputError("--dequantize does nothing: no model given is a quantized checkpoint "
                         "(a GGUF file is always evaluated dequantized)")


def check_same_architecture(base_cfg: dict[str, Any], subj_cfg: dict[str, Any],
                            subj: ModelSource, base: ModelSource) -> None:
    """A GGUF or quantized subject of another model type is input error, found up front."""
    if not (subj.gguf_file or base.gguf_file or is_quantized(subj_cfg)):
        return
    b, s = str(base_cfg.get("model_type", "")), str(subj_cfg.get("model_type", ""))
    if b and s and b != s:
        raise InputError(f"subject '{subj.spec}' is a {s} model but baseline '{base.spec}' is "
                         f"{b}: they must be the same architecture")


# --- tokenizer --------------------------------------------------------------------------


def tokenizer_origin(source: ModelSource) -> str | None:
    """Where a source's tokenizer comes from (None: a GGUF file with no tokenizer at all)."""
    path = gguf_path(source)
    if path is None:
        return TOKENIZER_CHECKPOINT
    if any((path.parent / name).is_file() for name in _TOKENIZER_FILES):
        return TOKENIZER_FOLDER
    from invarlock.models.gguf_file import gguf_info

    return TOKENIZER_GGUF if gguf_info(path).has_tokenizer else None


# --- config comparison ------------------------------------------------------------------


def _normalized(source: ModelSource, config: dict[str, Any]) -> dict[str, Any]:
    """The config with transformers' defaults filled in (what the model is built from)."""
    from transformers import AutoConfig

    if source.gguf_file:
        return dict(config)
    try:
        fields = {k: v for k, v in config.items() if k not in ("transformers_version",)}
        return AutoConfig.for_model(**fields).to_dict()
    except Exception:  # an unusual config: compare it as written
        return dict(config)


def _has(config: dict[str, Any], key: str) -> bool:
    return key in config or (key == "rope_theta" and _value(config, key) is not None)


def _value(config: dict[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    if key == "rope_theta":  # transformers 5 keeps it inside rope_parameters
        rope = config.get("rope_parameters") or {}
        return rope.get("rope_theta") if isinstance(rope, dict) else None
    return None


def comparable_configs(base_src: ModelSource, base_cfg: dict[str, Any], subj_src: ModelSource,
                       subj_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two configs the invariants compare.

    A GGUF file states only some config keys (sizes, heads, norm epsilon, rope base,
    vocabulary, tying, special ids); the rest are transformers' defaults, not facts about the
    checkpoint. When either side is GGUF, both sides are compared on the keys the file
    states, with defaults filled in on both sides.
    """
    gguf_sides = [s for s in (base_src, subj_src) if s.gguf_file]
    if not gguf_sides:
        return base_cfg, subj_cfg
    from invarlock.models.gguf_file import gguf_info

    keys: set[str] = {"model_type", "architectures"}
    for side in gguf_sides:
        keys |= set(gguf_info(gguf_path(side)).carried_keys)
    base_n, subj_n = _normalized(base_src, base_cfg), _normalized(subj_src, subj_cfg)
    # a key only one side's config class has (GPT-2's GGUF `feed_forward_length`, `n_ctx`)
    # describes nothing the other side can disagree with; weight shapes are checked anyway
    keys = {k for k in keys if _has(base_n, k) and _has(subj_n, k)}
    base_view = {k: _value(base_n, k) for k in sorted(keys)}
    subj_view = {k: _value(subj_n, k) for k in sorted(keys)}
    for key, value in subj_view.items():
        if _same_float32(base_view[key], value):
            subj_view[key] = base_view[key]  # GGUF stores floats in single precision
    return base_view, subj_view


def _same_float32(a: Any, b: Any) -> bool:
    import struct

    if not (isinstance(a, float) and isinstance(b, float)):
        return False
    return struct.pack("<f", a) == struct.pack("<f", b)


# --- the certificate's record -----------------------------------------------------------


def describe_files(source: ModelSource, config: dict[str, Any], device: str,
                   dequantize: bool) -> dict[str, Any] | None:
    """The format of a checkpoint from its files (None: a float checkpoint)."""
    path = gguf_path(source)
    if path is not None:
        from invarlock.models.gguf_file import gguf_info

        return quantized.gguf_format(gguf_info(path))
    if is_quantized(config):
        runs = quantized.runs_kernels(config, device) and not dequantize
        return quantized.hf_format(config, device, dequantized=not runs)
    return None


def describe(source: ModelSource, config: dict[str, Any], model: Any, device: str,
             dequantize: bool) -> dict[str, Any] | None:
    """`describe_files` plus what the loaded model shows: a digest of every module's
    effective weight and the format tensors the invariants accepted."""
    record = describe_files(source, config, device, dequantize)
    if record is None:
        return None
    from invarlock.models.effective import EffectiveWeights, module_digests

    view = EffectiveWeights(model)
    record["quantized_modules"] = len(view.quantized)
    record["format_tensors"] = len(view.format_tensors)
    record["format_tensor_examples"] = view.format_tensors[:5]
    record["module_digests"] = module_digests(model)
    record["tokenizer"] = tokenizer_origin(source) or TOKENIZER_BASELINE
    return record
