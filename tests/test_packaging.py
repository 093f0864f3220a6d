"""Packaging: every subpackage ships, and the wheel carries policies and schemas."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _shipped_folders() -> set[str]:
    """Every folder under invarlock/ that holds a file to ship (code or data)."""
    return {".".join(p.parent.relative_to(ROOT).parts)
            for p in (ROOT / "invarlock").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_every_subpackage_and_data_folder_is_listed_in_pyproject():
    """setuptools warns about (and will stop shipping) a data folder that is not a package."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    assert "invarlock.demo.model" in _shipped_folders()
    assert _shipped_folders() | {"invarlock.policies"} == listed


def _build_wheel(out: Path) -> tuple[Path, str]:
    """Build the wheel offline; returns it and everything the build printed."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-v", "-w", str(out), str(ROOT)],
                          check=True, capture_output=True, text=True)
    return next(out.glob("invarlock-*.whl")), done.stdout + done.stderr


def test_wheel_builds_without_setuptools_warnings_and_carries_policies_and_data(tmp_path):
    """A newcomer's first `pip install -e .` prints no deprecations (license as a TOML
    table, data folders missing from `packages`), and the wheel holds what a run reads."""
    wheel, log = _build_wheel(tmp_path)
    for warning in ("SetuptoolsDeprecationWarning", "SetuptoolsWarning", "BuildBackendWarning",
                    "is deprecated", "absent from the `packages`"):
        assert warning not in log, [line for line in log.splitlines() if warning in line][:3]
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for required in ("invarlock/policies/tiers.yaml", "invarlock/policies/profiles.yaml",
                     "invarlock/certificate/schema.json", "invarlock/demo/model/config.json",
                     "invarlock/demo/model/model.safetensors",
                     "invarlock/demo/model/tokenizer.json",
                     "invarlock-0.1.0.dist-info/licenses/LICENSE"):
        assert required in names
    metadata = archive.read("invarlock-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
