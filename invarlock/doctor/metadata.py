"""What a checkpoint is, from its files alone: tensor names, shapes, dtypes and bytes.

safetensors files start with an 8-byte little-endian header length and a JSON header that
lists every tensor; reading it costs a few kilobytes, whatever the model size, and needs
neither torch nor the safetensors package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from invarlock.errors import InputError
from invarlock.safetensors_header import read_header

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
               "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class CheckpointTensors:
    """Every tensor a checkpoint stores (all shards), by name."""

    tensors: dict[str, TensorInfo]

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({t.dtype for t in self.tensors.values()}))


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one .safetensors file (header only)."""
    try:
        header, data_start = read_header(path)
        data_bytes = path.stat().st_size - data_start
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(str(exc)) from None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            info = TensorInfo(str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: malformed header entry for tensor '{name}'") from None
        _check_extent(path, name, info, begin, end, data_bytes)
        tensors[name] = info
    return tensors


def _check_extent(path: Path, name: str, info: TensorInfo, begin: int, end: int,
                  data_bytes: int) -> None:
    """The tensor's bytes must lie inside the file and match its dtype and shape: a file cut
    short (an interrupted copy) keeps an intact header but loses its data."""
    if not 0 <= begin <= end:
        raise InputError(f"{path}: tensor '{name}' has invalid data offsets [{begin}, {end}]")
    if end > data_bytes:
        raise InputError(f"{path} is truncated: tensor '{name}' ends at byte {end} of the data "
                         f"section, which holds only {max(data_bytes, 0)} bytes")
    width = DTYPE_BYTES.get(info.dtype)
    if width is not None and end - begin != info.numel * width:
        raise InputError(f"{path}: tensor '{name}' holds {end - begin} bytes but "
                         f"{info.dtype}{list(info.shape)} needs {info.numel * width}")


def checkpoint_tensors(files: list[Path]) -> CheckpointTensors:
    """All tensors of a safetensors checkpoint (single file or shards; the index is skipped)."""
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        if path.suffix == ".safetensors":
            tensors.update(read_safetensors_header(path))
    return CheckpointTensors(tensors)


def shape_differences(base: CheckpointTensors, subject: CheckpointTensors,
                      limit: int = 3) -> list[str]:
    """Human lines naming tensors that exist in one checkpoint only or differ in shape."""
    lines = []
    only_base = sorted(set(base.tensors) - set(subject.tensors))
    only_subj = sorted(set(subject.tensors) - set(base.tensors))
    if only_base:
        lines.append(f"{len(only_base)} tensor(s) only in the baseline (first: {only_base[0]})")
    if only_subj:
        lines.append(f"{len(only_subj)} tensor(s) only in the subject (first: {only_subj[0]})")
    reshaped = [n for n in sorted(set(base.tensors) & set(subject.tensors))
                if base.tensors[n].shape != subject.tensors[n].shape]
    for name in reshaped[:limit]:
        lines.append(f"{name}: shape {list(base.tensors[name].shape)} vs "
                     f"{list(subject.tensors[name].shape)}")
    if len(reshaped) > limit:
        lines.append(f"... and {len(reshaped) - limit} more reshaped tensor(s)")
    return lines


# config.json keys that may differ between a baseline and a faithful edit of it.
IGNORED_CONFIG_KEYS = frozenset({
    "torch_dtype", "dtype", "quantization_config", "transformers_version", "_name_or_path",
    "_commit_hash", "architectures", "use_cache",
})


def config_differences(base: dict, subject: dict, limit: int = 3) -> list[str]:
    """config.json fields that differ, dtype/quantization/bookkeeping fields excepted."""
    keys = sorted((set(base) | set(subject)) - IGNORED_CONFIG_KEYS)
    differing = [k for k in keys if base.get(k) != subject.get(k)]
    lines = [f"{k}: {base.get(k)!r} vs {subject.get(k)!r}" for k in differing[:limit]]
    if len(differing) > limit:
        lines.append(f"... and {len(differing) - limit} more")
    return lines
