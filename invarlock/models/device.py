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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def resolve_device_map(requested: str | None) -> str | None:
    """A device-map strategy accelerate understands, or None (the whole model on one device).

    auto/balanced spread the layers evenly over the GPUs, balanced_low_0 keeps GPU 0 lighter,
    sequential fills GPU 0 first; all of them fall back to CPU and then disk offload when
    the GPUs (or the --max-memory limits) are full.
    """
    if requested is None or str(requested).strip().lower() in ("", "none"):
        return None
    choice = str(requested).strip().lower()
    if choice not in DEVICE_MAPS:
        raise InputError(f"unknown device map '{requested}'; use {', '.join(DEVICE_MAPS)}")
    return choice


def parse_max_memory(spec: str | dict | None) -> dict[int | str, int] | None:
    """Per-device memory limits for the device map: "0=20GiB,1=20GiB,cpu=64GiB" or a mapping.

    Keys are GPU indices, "cpu" or "mps"; values are byte counts or sizes with a unit
    (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB). Returns bytes per device.
    """
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise InputError(f"--max-memory entry '{part.strip()}' is not DEVICE=SIZE "
                                 "(e.g. 0=20GiB,cpu=64GiB)")
            items.append((key, value))
    elif isinstance(spec, dict):
        items = list(spec.items())
    else:
        raise InputError("max_memory must be 'DEVICE=SIZE,...' or a mapping of device to size")
    limits: dict[int | str, int] = {}
    for key, value in items:
        device = str(key).strip().lower()
        if device.isdigit():
            limits[int(device)] = _size_bytes(value, device)
        elif device in ("cpu", "mps"):
            limits[device] = _size_bytes(value, device)
        else:
            raise InputError(f"max_memory device '{key}' is not a GPU index, cpu or mps")
    return limits


def _size_bytes(value: object, device: str) -> int:
    import re

    text = str(value).strip().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise InputError(f"max_memory for {device}: '{value}' is not a size such as 20GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def free_memory(device: str, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes a second model could still take on `device`: the free memory of a CUDA device,
    the host's MemAvailable otherwise (the model lives in host memory); None when unknown."""
    if device.startswith("cuda"):
        try:
            free, _total = torch.cuda.mem_get_info(torch.device(device))
        except (RuntimeError, AssertionError):
            return None
        return int(free)
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
