"""Two runs into one output folder: the second stops at once (exit 2) naming the holder."""

from __future__ import annotations

import os

from tests.faults.conftest import certify


def test_second_run_into_a_busy_output_folder_stops_naming_the_holder(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    from invarlock import outdir

    out = tmp_path / "shared"
    with outdir.claim(out):  # the first run holds the folder
        code, payload, _ = certify(tiny_gpt2_dir, tiny_gpt2_dir, out, sonnets_path, fast_preset)
        assert code == 2
        assert "in use by another run" in payload["error"]
        assert f"pid {os.getpid()}" in payload["error"]
        assert not (out / "evaluation.cert.json").exists()
    code, payload, _ = certify(tiny_gpt2_dir, tiny_gpt2_dir, out, sonnets_path, fast_preset)
    assert code == 0  # released: the folder is free again
    assert not (out / outdir.LOCK_NAME).exists()


def test_lock_is_released_when_its_holder_dies(tmp_path):
    import subprocess
    import sys

    from invarlock import outdir

    out = tmp_path / "o"
    code = ("import os, sys; from pathlib import Path; from invarlock import outdir; "
            "outdir.claim(Path(sys.argv[1])); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert (out / outdir.LOCK_NAME).exists()  # left behind by a process that died
    with outdir.claim(out):  # the kernel dropped its lock: the folder can be claimed
        pass
