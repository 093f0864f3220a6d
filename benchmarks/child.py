"""Run one benchmark step in its own process and measure it: wall time and that process's own
peak RSS (from wait4, so other processes of the run do not count).

Run as a script (`certify_command(blocks=True)`), it certifies with no memory reported free
for a second model: the blocks schedule, one model resident at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Child:
    code: int
    wall: float        # seconds
    peak: float        # peak RSS, bytes
    stdout: str
    stderr: str


def run_child(cmd: list[str], *, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Child:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: KiB on Linux
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Child(os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024.0,
                     out.read(), err.read())


def certify_command(*, blocks: bool) -> list[str]:
    """Arguments after the interpreter for `invarlock ...`, in the blocks schedule if asked."""
    return [str(HERE), "--one-model-at-a-time"] if blocks else ["-m", "invarlock"]


def _one_model_at_a_time(argv: list[str]) -> None:
    from invarlock.cli import main
    from invarlock.models import device

    device.free_memory = lambda _device: 0
    main.main(argv, prog_name="invarlock")  # exits with certify's exit code


if __name__ == "__main__" and sys.argv[1:2] == ["--one-model-at-a-time"]:
    _one_model_at_a_time(sys.argv[2:])
