"""Run one benchmark step in its own process and measure it: wall time and that process's own
peak RSS (from wait4, so other processes of the run do not count)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


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
