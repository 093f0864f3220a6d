"""Quantization formats: which one a checkpoint is in, whether it can run here, what to record.

A Hugging Face folder whose config.json carries `quantization_config` is loaded through
transformers with that method's backend; a GGUF file is loaded by transformers' GGUF reader,
which dequantizes it. This module decides, from files alone and before any model loads,
whether the backend is installed (else: EvidenceError naming the extra to install) and
whether the backend has kernels for the device (else: EvidenceError, unless the user asked for
a dequantized forward), and it describes the format for the certificate.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from invarlock.errors import EvidenceError, InputError
from invarlock.gguf_types import GGUF_BITS, mixed_types
from invarlock.safetensors_header import read_header

logger = logging.getLogger(__name__)

FORWARD_KERNELS = "quantized-kernels"   # the quantized modules ran
FORWARD_DEQUANTIZED = "dequantized"     # float weights made from the quantized ones ran


@dataclass(frozen=True)
class Backend:
    """What a quantization method needs: modules to import, a distribution, an extra."""

    method: str
    modules: tuple[str, ...]     # importable names that must be present
    distribution: str            # where the backend's version is read
    extra: str                   # pip install 'invarlock[<extra>]'
    devices: tuple[str, ...]     # device types its kernels run on


BACKENDS: dict[str, Backend] = {b.method: b for b in (
    Backend("torchao", ("torchao",), "torchao", "torchao", ("cpu", "cuda")),
    Backend("bitsandbytes", ("bitsandbytes",), "bitsandbytes", "bitsandbytes", ("cpu", "cuda")),
    Backend("hqq", ("hqq",), "hqq", "hqq", ("cpu", "cuda")),
    Backend("quanto", ("optimum.quanto",), "optimum-quanto", "quanto", ("cpu", "cuda")),
    Backend("compressed-tensors", ("compressed_tensors",), "compressed-tensors",
            "compressed-tensors", ("cpu", "cuda")),
    Backend("gptq", ("gptqmodel", "optimum"), "gptqmodel", "gptq", ("cuda",)),
    Backend("awq", ("gptqmodel",), "gptqmodel", "awq", ("cuda",)),
    Backend("fp8", ("torch",), "torch", "hf", ("cuda",)),
    Backend("fbgemm_fp8", ("fbgemm_gpu",), "fbgemm-gpu", "fbgemm-fp8", ("cuda",)),
)}


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's quantization_config (None: a float checkpoint); any other shape than an
    object is an input error, not a float checkpoint in disguise."""
    value = config.get("quantization_config")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError(f"config.json's quantization_config must be an object, got "
                         f"{type(value).__name__}")
    return dict(value)


def method_of(config: dict[str, Any]) -> str | None:
    """The checkpoint's quantization method (quant_method), or None for a float checkpoint."""
    qc = quantization_config(config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method is None or method == "":
        raise InputError("config.json has a quantization_config without quant_method")
    if not isinstance(method, str) or not method.strip():
        raise InputError(f"config.json's quantization_config.quant_method must be a method "
                         f"name, got {str(method)[:40]!r}")
    return method.strip().lower()


def known_methods() -> list[str]:
    """quant_method values transformers can load."""
    from transformers.utils.quantization_config import QuantizationMethod

    return sorted(str(m.value) for m in QuantizationMethod)


def check_runnable(config: dict[str, Any], device: str, dequantize: bool, spec: str) -> None:
    """Stop before loading when a quantized checkpoint cannot be evaluated here.

    Unknown method: InputError (exit 2). Backend missing: EvidenceError (exit 3) naming the
    extra. No kernels for the device and no `dequantize`: EvidenceError saying so.
    """
    method = method_of(config)
    if method is None or method == "gguf":
        return
    if method not in known_methods():
        raise InputError(f"model '{spec}' uses quantization method '{method}', which "
                         f"transformers does not know (known: {', '.join(known_methods())})")
    backend = BACKENDS.get(method)
    if backend is None:
        raise EvidenceError(f"model '{spec}' uses quantization method '{method}', which "
                            "InvarLock cannot evaluate (no supported backend)")
    missing = [m for m in backend.modules if not _importable(m)]
    if missing:
        raise EvidenceError(f"model '{spec}' is quantized with {method}, whose backend is not "
                            f"installed ({', '.join(missing)}): pip install "
                            f"'invarlock[{backend.extra}]'")
    kind = device.split(":")[0]
    if kind not in backend.devices and not dequantize:
        raise EvidenceError(f"{method} has no kernels for {kind}: model '{spec}' cannot be "
                            f"evaluated as shipped here; run on "
                            f"{' or '.join(backend.devices)}, or pass --dequantize to evaluate "
                            "its dequantized float weights (recorded in the certificate)")


# safetensors dtypes of plain float weights; every quantization method stores something else
# (int8/uint8/int32 packed codes, float8) for the weights it quantized
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def stored_dtypes(files: list[Path]) -> dict[str, int] | None:
    """Tensors per dtype over the safetensors headers of `files` (the header only; no tensor
    is read). None when a file is not safetensors (pickles say nothing without unpickling)."""
    counts: dict[str, int] = {}
    for path in files:
        if path.name.endswith(".index.json"):
            continue
        if path.suffix != ".safetensors":
            return None
        try:
            header, _ = read_header(path)
        except (OSError, ValueError):
            return None  # unreadable: the loader reports it in its own words
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                dtype = str(entry.get("dtype"))
                counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def check_claim(config: dict[str, Any], files: list[Path], spec: str) -> None:
    """A quantization method declared in config.json must be held by the weights.

    A float checkpoint whose config names a method would otherwise be certified as that
    method and bit width with no quantized module (or be quantized while loading, which
    certifies a model nobody shipped). It is refused, saying what the weights are; removing
    `quantization_config` certifies it as the float checkpoint it is.
    """
    method = method_of(config)
    if method is None or method == "gguf":
        return
    dtypes = stored_dtypes(files)
    if not dtypes or set(dtypes) - FLOAT_DTYPES:
        return
    held = ", ".join(sorted(dtypes))
    raise InputError(f"model '{spec}' declares quantization method '{method}' in config.json, "
                     f"but its weights hold no quantized tensor (every tensor is {held}): it is "
                     "a float checkpoint; remove quantization_config to certify it as one")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def runs_kernels(config: dict[str, Any], device: str) -> bool:
    backend = BACKENDS.get(method_of(config) or "")
    return backend is not None and device.split(":")[0] in backend.devices


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def bits_and_group(method: str, qc: dict[str, Any]) -> tuple[int | None, int | None]:
    """Weight bits and group size as the method's config states them (None: not stated)."""
    bits = qc.get("bits") or qc.get("nbits") or qc.get("num_bits")
    group = qc.get("group_size")
    if method == "bitsandbytes":
        bits = 8 if qc.get("load_in_8bit") else 4 if qc.get("load_in_4bit") else bits
        group = 64 if qc.get("load_in_4bit") else group  # bnb 4-bit blocks of 64
    elif method == "quanto":
        bits = {"int8": 8, "int4": 4, "int2": 2, "float8": 8}.get(str(qc.get("weights")), bits)
    elif method == "torchao":
        kind = _torchao_type(qc)
        bits = 8 if "Int8" in kind or "int8" in kind else 4 if "4" in kind else bits
        group = _find_key(qc.get("quant_type"), "group_size") or group
    elif method == "compressed-tensors":
        weights = _find_key(qc.get("config_groups"), "weights") or {}
        if isinstance(weights, dict):
            bits, group = weights.get("num_bits", bits), weights.get("group_size", group)
    elif method in ("fp8", "fbgemm_fp8"):
        bits = 8
    elif method == "hqq":
        nested = _find_key(qc, "weight_quant_params") or {}
        if isinstance(nested, dict):
            bits, group = nested.get("nbits", bits), nested.get("group_size", group)
    return (int(bits) if isinstance(bits, (int, float)) else None,
            int(group) if isinstance(group, (int, float)) else None)


def _torchao_type(qc: dict[str, Any]) -> str:
    quant_type = qc.get("quant_type")
    if isinstance(quant_type, str):
        return quant_type
    found = _find_key(quant_type, "_type")
    return str(found or "")


def _find_key(node: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in nested dicts/lists (depth first)."""
    if isinstance(node, dict):
        if key in node:
            return node[key]
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_key(child, key)
        if found is not None:
            return found
    return None


def hf_format(config: dict[str, Any], device: str, dequantized: bool) -> dict[str, Any]:
    """The certificate's `format` record of a Hugging Face quantized checkpoint."""
    method = method_of(config) or ""
    qc = quantization_config(config) or {}
    bits, group = bits_and_group(method, qc)
    backend = BACKENDS.get(method)
    return {
        "name": "hf-quantized", "method": method, "bits": bits, "group_size": group,
        "backend": backend.distribution if backend else None,
        "backend_version": version_of(backend.distribution) if backend else None,
        "forward": FORWARD_DEQUANTIZED if dequantized else FORWARD_KERNELS,
        "dequantize_requested": bool(dequantized),
        "quantization_config": qc,
    }


def gguf_format(info: Any) -> dict[str, Any]:
    """The certificate's `format` record of a GGUF file (always a dequantized forward)."""
    import gguf

    file_type = info.file_type
    try:
        block = int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[file_type]][0])
    except KeyError:
        block = None
    return {
        "name": "gguf", "method": "gguf", "bits": GGUF_BITS.get(file_type),
        "group_size": block if block and block > 1 else None,
        "backend": "gguf", "backend_version": version_of("gguf"),
        "forward": FORWARD_DEQUANTIZED, "dequantize_requested": False,
        "file": info.path.name, "file_type": file_type,
        "tensor_types": dict(info.tensor_types), "gguf_architecture": info.architecture,
        "tensor_parameters": dict(info.type_parameters),
        "mixed_types": mixed_types(info.type_parameters),
    }
