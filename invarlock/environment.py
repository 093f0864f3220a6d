"""What the certificate records about where it was produced: Python, platform, libraries,
device. Library versions are read from installed metadata, so nothing heavy is imported."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "datasets", "numpy",
             "scipy")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe(device: dict[str, Any]) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "device": device,
    }
