"""Step outputs through the GITHUB_OUTPUT file, in the multi-line form with a random
delimiter, so a value with newlines (or one that looks like `name=value`) stays one value."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from pathlib import Path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def format_outputs(outputs: Mapping[str, str]) -> str:
    lines = []
    for name, value in outputs.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid output name {name!r}")
        delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
        while delimiter in value:  # astronomically unlikely; never emit a breakable block
            delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
        lines += [f"{name}<<{delimiter}", value, delimiter]
    return "".join(line + "\n" for line in lines)


def write_outputs(path: Path, outputs: Mapping[str, str]) -> None:
    """Append to GITHUB_OUTPUT (other steps' lines in the same file are kept)."""
    with Path(path).open("a", encoding="utf-8") as fh:
        fh.write(format_outputs(outputs))
