"""The header of a .safetensors file: an 8-byte little-endian length, then a JSON object
naming every tensor's dtype, shape and byte offsets in the data section that follows. Read
without torch or the safetensors package; everything in it is untrusted."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the header's JSON object, the byte offset where the data section starts).

    OSError where the file cannot be read; ValueError, saying what is wrong, where it is not
    a safetensors header."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise ValueError(f"{path}: safetensors header of {length} bytes is implausible")
        text = fh.read(length)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + length
