"""The image, built and run for real (slow): `make image-test` builds the Dockerfile with
buildah on a Debian base made by debootstrap and certifies the demo inside it on CPU.

Needs root, buildah and debootstrap, Debian's mirror and the package index (see
scripts/image_test.sh for the settings, e.g. TORCH_INDEX_URL and PIP_FIND_LINKS where
PyTorch's index is not reachable). Takes about ten minutes with the vfs storage driver.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.github.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("buildah")
                    or not shutil.which("debootstrap"),
                    reason="needs root, buildah and debootstrap")
def test_the_image_builds_and_certifies_the_demo_inside(tmp_path):
    env = dict(os.environ)
    work = Path(env.setdefault("IMAGE_TEST_DIR", "/var/tmp/invarlock-image"))
    done = subprocess.run(["make", "image-test"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = (work / "figures.txt").read_text()
    assert "demo_verdict: PASS" in figures
    assert int(re.search(r"build_seconds: (\d+)", figures).group(1)) > 0
