"""GGUF sides evaluated by llama.cpp (`invarlock.models.llamacpp`): whether and how a side
runs there, its model opened once per run and side, and what the certificate and the
baseline cache key record of it."""

from __future__ import annotations

from typing import Any

from invarlock import distribution
from invarlock.enums import MetricKind
from invarlock.stages.records import CertifyRequest, RunInputs


def runtime_settings(inputs: RunInputs, req: CertifyRequest, label: str,
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


def distribution_k(inputs: RunInputs, req: CertifyRequest, seq_len: int) -> int | None:
    """How many next-token log-probabilities the baseline keeps per scored token: none for a
    classifier, nor for a baseline llama.cpp scores (it returns per-token losses only), so
    such a baseline's cache entry is complete without them."""
    if inputs.kind is MetricKind.ACCURACY:
        return None
    if runtime_settings(inputs, req, "baseline", seq_len) is not None:
        return None
    return distribution.TOP_K


def served_model(inputs: RunInputs, req: CertifyRequest, label: str, seq_len: int) -> Any:
    """The side's llama.cpp model, loaded once per run and side (None: scored by torch)."""
    settings = runtime_settings(inputs, req, label, seq_len)
    if settings is None:
        return None
    if settings not in inputs.served:
        from invarlock.models.llamacpp import LlamaCppModel

        inputs.served[settings] = LlamaCppModel(settings)
    return inputs.served[settings]


def close_served(inputs: RunInputs, label: str) -> None:
    """Unload the side's llama.cpp model once its windows are scored."""
    from invarlock.models.source import gguf_path

    side = inputs.baseline if label == "baseline" else inputs.subject
    path = None if side is None else gguf_path(side.source)
    for settings in [s for s in inputs.served if path is not None and s.path == path]:
        inputs.served.pop(settings).close()


def record_runtime(inputs: RunInputs, req: CertifyRequest, label: str, seq_len: int,
                   record: dict[str, Any]) -> None:
    """A GGUF side evaluated by llama.cpp says so, and how, in its `format` record."""
    settings = runtime_settings(inputs, req, label, seq_len)
    if settings is not None and record.get("format") is not None:
        from invarlock.models import llamacpp

        record["format"].update(llamacpp.format_fields(settings))


def device_tag(inputs: RunInputs, req: CertifyRequest, seq_len: int) -> str:
    """The baseline cache key's device: llama.cpp's results also depend on its build and
    settings, so they are part of the key."""
    base = inputs.device.split(":")[0]
    settings = runtime_settings(inputs, req, "baseline", seq_len)
    if settings is None:
        return base
    from invarlock.models import llamacpp

    return f"{base} {llamacpp.cache_tag(settings)}"
