"""Device and dtype choice: CUDA, then Apple MPS, then CPU; float32 unless the device gains."""

from __future__ import annotations

import logging
from pathlib import Path

from invarlock.errors import EvidenceError, InputError, MissingExtraError

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise MissingExtraError("loading and evaluating models") from exc

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(requested: str = "auto") -> str:
    """Concrete device string for ``requested`` ("auto", "cpu", "cuda", "cuda:N", "mps").

    Explicit choices are validated here so that a missing accelerator is one clear
    InputError instead of a torch failure in the middle of a run.
    """
    choice = (requested or "auto").strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "mps":
        if not _mps_available():
            raise InputError("device 'mps' was requested but Apple MPS is not available here")
        return "mps"
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EvidenceError(cuda_unavailable(requested))
        if choice.startswith("cuda:"):
            index = choice.split(":", 1)[1]
            count = torch.cuda.device_count()
            if not index.isdigit() or int(index) >= count:
                raise InputError(
                    f"device '{requested}' does not exist; this machine has {count} CUDA "
                    f"device(s): cuda:0..cuda:{count - 1}"
                )
        return choice
    raise InputError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps")


# Oldest NVIDIA Linux driver branch for each CUDA major version (CUDA's minor version
# compatibility: any 12.x runtime runs on 525+, any 13.x on 580+).
DRIVER_FLOOR = {12: "525", 13: "580"}
_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


def cuda_unavailable(requested: str) -> str:
    """One line for "CUDA was requested but cannot start", naming both versions that matter:
    the CUDA torch was built for (and the driver that needs) and the driver found."""
    built = torch.version.cuda
    if built is None:
        wanted = f"torch {torch.__version__} is a CPU-only build"
    else:
        floor = DRIVER_FLOOR.get(int(built.split(".")[0]))
        wanted = (f"torch {torch.__version__} is built for CUDA {built}"
                  + (f" (NVIDIA driver {floor} or newer)" if floor else ""))
    driver = nvidia_driver_version()
    found = (f"NVIDIA driver {driver} found" if driver else
             "no NVIDIA driver visible (no GPU passed to this machine or container)")
    return (f"device '{requested}' was requested but CUDA cannot start: {wanted}; {found}. "
            "Use device cpu to run on the CPU")


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, or None when there is none."""
    try:
        text = _DRIVER_VERSION_FILE.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def checkpoint_dtype(config: dict) -> str | None:
    """The dtype a checkpoint was saved in, from config.json ("dtype" or legacy "torch_dtype")."""
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).replace("torch.", "") if value else None


def resolve_dtype(requested: str, device: str, checkpoint_dtype: str | None) -> torch.dtype:
    """Compute dtype for a model on ``device``.

    auto: float32 on CPU and MPS (half precision is slow or inexact there); on CUDA the
    checkpoint's own dtype when it is float16/bfloat16 (what the model was published in,
    half the memory), else float32. bfloat16 falls back to float32 on GPUs without bf16.
    """
    choice = (requested or "auto").strip().lower()
    choice = _DTYPE_ALIASES.get(choice, choice)
    if choice == "auto":
        saved = _DTYPE_ALIASES.get(checkpoint_dtype or "", checkpoint_dtype)
        if device.startswith("cuda") and saved in ("float16", "bfloat16"):
            if saved == "bfloat16" and not torch.cuda.is_bf16_supported():
                logger.info("bfloat16 checkpoint on a GPU without bf16 support: using float32")
                return torch.float32
            return DTYPES[saved]
        return torch.float32
    if choice not in DTYPES:
        raise InputError(f"unknown dtype '{requested}'; use auto, float32, float16 or bfloat16")
    if choice == "float16" and device == "cpu":
        logger.warning("float16 on CPU is slow and less accurate; consider float32 or bfloat16")
    return DTYPES[choice]


def describe_device(device: str) -> dict[str, object]:
    """What the certificate records about the device: its type, name and CPU threads."""
    import platform

    kind = device.split(":")[0]
    if kind == "cuda":
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    elif kind == "mps":
        name = "Apple MPS"
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {"type": kind, "name": name, "threads": int(torch.get_num_threads())}
