"""Packaging: every subpackage ships, and the wheel carries policies and schemas."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "invarlock").rglob("__init__.py")}
    assert on_disk | {"invarlock.policies"} == listed


def test_wheel_contains_policies_schema_and_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True,
                   capture_output=True)
    wheel = next(tmp_path.glob("invarlock-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("invarlock/policies/tiers.yaml", "invarlock/policies/profiles.yaml",
                     "invarlock/certificate/schema.json"):
        assert required in names
