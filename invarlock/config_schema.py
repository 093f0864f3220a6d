"""JSON Schema of run configs and presets (the seed's shape: model, dataset, edit, eval, guards,
auto, output). Unknown keys are errors; `invarlock.config` names the nearest valid key."""

from __future__ import annotations

from typing import Any

_POS_INT = {"type": "integer", "minimum": 1}
_SEED = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}  # numpy and torch seeds
_STR = {"type": "string", "minLength": 1}
_OPT_STR = {"type": ["string", "null"]}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


MODEL = _obj({
    "id": {**_STR, "description": "baseline: local directory, hub id, hf:ID, or 'demo'"},
    "subject": {"anyOf": [_OPT_STR, {"type": "array", "items": _STR, "minItems": 1}],
                "description": "subject checkpoint(s) (omit to apply `edit`); several are "
                               "certified one at a time against one baseline evaluation"},
    # auto, hf_causal, hf_mlm, hf_seq_cls, their aliases, or an adapter plugin's name
    # (checked by invarlock.models.source.detect_adapter, which knows the plugins).
    "adapter": _STR,
    "device": {"type": "string", "pattern": r"^(auto|cpu|mps|cuda(:\d+)?)$"},
    # spread the model over devices through accelerate; max_memory: "0=20GiB,cpu=64GiB"
    # or a mapping of GPU index / cpu / mps to a size
    "device_map": {"type": ["string", "null"],
                   "enum": ["auto", "balanced", "balanced_low_0", "sequential", None]},
    "max_memory": {"type": ["string", "object", "null"]},
    "dtype": {"type": "string", "enum": ["auto", "float32", "float16", "bfloat16"]},
    "allow_pickle": {"type": "boolean"},
    "revision": _OPT_STR,
    "gguf_file": {**_OPT_STR, "description": "the GGUF file of a folder holding several"},
    "dequantize": {"type": "boolean",
                   "description": "evaluate a quantized model's dequantized float weights"},
    "runtime": {"type": "string", "enum": ["auto", "llama.cpp", "transformers"],
                "description": "what evaluates a GGUF side (auto: llama.cpp when installed)"},
})

DATASET = _obj({
    "provider": {"type": "string", "enum": ["demo", "text", "jsonl", "hf", "wikitext2"]},
    "path": _OPT_STR,
    "name": _OPT_STR,
    "config": _OPT_STR,
    "split": _OPT_STR,
    "text_field": _STR,
    "text_pair_field": _OPT_STR,
    "label_field": _STR,
    "seq_len": {"type": "integer", "minimum": 8},
    "stride": _POS_INT,
    "preview_n": _POS_INT,
    "final_n": _POS_INT,
    "seed": _SEED,
})

QUANT_RTN_PLAN = _obj({
    "bitwidth": {"type": "integer", "minimum": 2, "maximum": 8},
    "per_channel": {"type": "boolean"},
    "group_size": {"type": ["integer", "null"], "minimum": 1},
    "clamp_ratio": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "scope": {"type": "string", "enum": ["attn", "ffn", "all"]},
    "max_modules": {"type": ["integer", "null"], "minimum": 1},
})

# Built-in edit plans are checked here; an edit plugin's plan is checked by its own parser.
EDIT = {
    **_obj({"name": _STR, "plan": {"type": "object"}}, required=["name"]),
    "if": {"properties": {"name": {"const": "quant_rtn"}}},
    "then": {"properties": {"plan": QUANT_RTN_PLAN}},
}

PRIMARY_METRIC = _obj({
    "ratio_limit": {"type": "number", "exclusiveMinimum": 1.0},
    "accuracy_delta_min_pp": {"type": "number", "maximum": 0.0},
    "catastrophic_ratio": {"type": "number", "exclusiveMinimum": 1.0},
    "drift_band": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                   "minItems": 2, "maxItems": 2},
})

# Limits on the distribution evidence (invarlock.distribution_gate); a number gates.
DISTRIBUTION = _obj({
    "kld_mean_upper": {"type": "number", "exclusiveMinimum": 0},
    "same_top_p_lower": {"type": "number", "minimum": 0, "maximum": 1},
    "kld_p99_upper": {"type": "number", "exclusiveMinimum": 0},
})

EVAL = _obj({
    "metric": _obj({"kind": {"type": "string",
                             "enum": ["auto", "ppl_causal", "ppl_mlm", "accuracy"]}}),
    "loss": _obj({"type": {"type": "string",
                           "enum": ["auto", "causal", "mlm", "classification"]}}),
    "batch_size": {"type": ["integer", "null"], "minimum": 1},
    "bootstrap": _obj({
        "replicates": _POS_INT,
        "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
        "seed": _SEED,
    }),
    "primary_metric": PRIMARY_METRIC,
    "distribution": DISTRIBUTION,
})

AUTO = _obj({
    "enabled": {"type": "boolean"},
    "tier": {"type": "string", "enum": ["balanced", "conservative", "aggressive"]},
    "profile": {"type": "string", "enum": ["dev", "ci", "release"]},
    "allow_underpowered": {"type": "boolean",
                           "description": "run below the profile's evidence floor (flagged)"},
    "sequential": {"type": "boolean",
                   "description": "stop the final set early when a look decides"},
    "probes": {"type": "integer", "minimum": 0, "maximum": 0,
               "description": "reserved; only 0 is accepted"},
})

OUTPUT = _obj({
    "dir": _STR,
    "save_model": {"type": "boolean"},
    "save_report": {"type": "boolean"},
    "save_subject": _OPT_STR,
    "save_format": {"type": "string", "enum": ["safetensors", "gguf"]},
    "write_ve_subject": {**_OPT_STR, "description": "write a VE-corrected copy of the subject"},
    "cache": {"type": "boolean"},
    "cache_dir": _OPT_STR,
})

# Guard settings (tiers.yaml `guards:` shape, which is the seed's). Built-in guards are
# strict; other names are left to the guard registry, which accepts registered plugin guards
# and rejects the rest with the nearest known name. Numbers may also be written as strings
# such as "9e-4": YAML 1.1 (PyYAML) reads an exponent without a decimal point as a string.
# Such text is held to the same bounds as the number (`NUMERIC_TEXT_BOUNDS`, checked by
# invarlock.config), so a quoted '1e999' or '-1' is refused as the unquoted one is.
_MODE = {"enum": ["off", "monitor", "gate", False]}  # YAML 1.1 reads a bare `off` as false
_NUMERIC_TEXT = {"type": "string", "pattern": r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"}
NUMERIC_TEXT_BOUNDS = "numericTextBounds"


def _number(**bounds: Any) -> dict[str, Any]:
    return {"anyOf": [{"type": "number", **bounds},
                      {**_NUMERIC_TEXT, NUMERIC_TEXT_BOUNDS: bounds}]}


_FAMILY_NUMBERS = _obj({f: _number(minimum=0) for f in ("attn", "ffn", "embed", "other")})
_FAMILY_SCOPE = {"oneOf": [
    {"type": "string", "enum": ["all", "attn", "ffn", "embed", "other"]},
    {"type": "array", "items": {"type": "string", "enum": ["attn", "ffn", "embed", "other"]},
     "minItems": 1, "uniqueItems": True},
]}

GUARDS = {
    "type": "object",
    "properties": {
        "order": {"type": "array", "items": _STR, "minItems": 1},
        "calibration_windows": {"type": "integer", "minimum": 2,
                                "description": "K: first K final windows for RMT and VE"},
        "invariants": _obj({"mode": _MODE}),
        "spectral": _obj({
            "mode": _MODE,
            "scope": _FAMILY_SCOPE,
            "sigma_quantile": _number(exclusiveMinimum=0, exclusiveMaximum=1),
            "deadband": _number(minimum=0),
            "max_caps": {"type": "integer", "minimum": 0},
            "max_spectral_norm": {"anyOf": [{"type": "null"}, *_number(
                exclusiveMinimum=0)["anyOf"]]},
            "multiple_testing": _obj({
                "method": {"type": "string", "enum": ["bh", "bonferroni"]},
                "alpha": _number(exclusiveMinimum=0, exclusiveMaximum=1),
                "m": {"type": "integer", "minimum": 1},
            }),
            "family_caps": _FAMILY_NUMBERS,
            "module_change_limit": {"anyOf": [{"type": "null"}, *_number(
                exclusiveMinimum=0)["anyOf"]]},
            "edit_size_limit": {"anyOf": [{"type": "null"}, *_number(
                exclusiveMinimum=0)["anyOf"]]},
            "edit_along_data_limit": {"anyOf": [{"type": "null"}, *_number(
                exclusiveMinimum=0)["anyOf"]]},
        }),
        "rows": _obj({
            "mode": _MODE,
            "tau": _number(exclusiveMinimum=0),
            "max_share": _number(minimum=0, maximum=1),
        }),
        "rmt": _obj({
            "mode": _MODE,
            "scope": _FAMILY_SCOPE,
            "max_rows": {"type": "integer", "minimum": 4},
            "groups": {"type": "integer", "minimum": 2},
            "null_z": _number(minimum=0),
            "false_alarm_rate": _number(exclusiveMinimum=0, exclusiveMaximum=1),
            "null_tau": _number(exclusiveMinimum=0),
            "edge_band": _number(exclusiveMinimum=0, maximum=0.2),
            "epsilon_by_family": _FAMILY_NUMBERS,
        }),
        "variance": _obj({
            "mode": _MODE,
            "tap": {"type": "string", "enum": ["all", "attn", "ffn",
                                               "post mlp.c_proj (pre-residual)"]},
            "targets": {"type": "string", "enum": ["all", "edited_modules_only"]},
            "discovery": _obj({
                "deadband": _number(minimum=0, maximum=1),
                "min_abs_adjust": _number(minimum=0, maximum=1),
                "max_scale_step": _number(minimum=0, maximum=1),
            }),
            "gating": _obj({
                "sided": {"type": "string", "enum": ["one-sided", "two-sided"]},
                "min_effect_lognll": _number(minimum=0),
            }),
        }),
    },
    "additionalProperties": {"type": "object", "properties": {"mode": _MODE}},
}

CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "InvarLock run configuration",
    **_obj({
        "model": MODEL,
        "dataset": DATASET,
        "edit": {**EDIT, "type": ["object", "null"]},
        "eval": EVAL,
        "guards": GUARDS,
        "auto": AUTO,
        "output": OUTPUT,
    }),
}
