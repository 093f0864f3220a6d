"""The heap kept warm between batches and handed back when it is not needed: a warm heap
serves each batch without fresh page faults, a trim returns memory that plain `free` keeps,
and the guards' weight stages trim after each probe, failed or not."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from invarlock import host_memory


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc's malloc_trim")
def test_trim_returns_free_pages_pinned_below_a_live_block():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunk, count = 64 * 1024, 1600  # below the mmap threshold: served from the heap
    blocks = []
    for _ in range(count + 1):
        block = libc.malloc(chunk)
        ctypes.memset(block, 1, chunk)  # touched: resident
        blocks.append(block)
    pin = blocks.pop()  # the last block, live above the others, keeps `free` from shrinking
    try:                # the heap
        for block in blocks:
            libc.free(block)
        before = _resident_bytes()
        assert host_memory.trim_host_memory() is True
        after = _resident_bytes()
    finally:
        libc.free(pin)
    assert before - after > chunk * count // 2, (before, after)


def test_the_guards_weight_stages_trim_even_when_a_probe_fails(monkeypatch):
    from invarlock.guards.measure import run as guard_run

    calls = []
    monkeypatch.setattr(guard_run, "trim_host_memory", lambda: calls.append(1) or True)
    owner = guard_run.GuardRun.__new__(guard_run.GuardRun)
    owner._timed = lambda name, fn, *args: fn(*args)

    def broken(_model):
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        owner._weights_stage("spectral", broken, object())
    assert calls == [1]


_BATCHES = """
import resource, sys
import numpy as np
if sys.argv[1] == "warm":
    from invarlock.host_memory import keep_heap_warm
    assert keep_heap_warm()
faults = []
for _ in range(4):  # four "batches" of forty 4 MiB temporaries, all freed at the end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    temporaries = [np.ones(2**20, dtype=np.float32) for _ in range(40)]
    del temporaries
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator settings")
def test_a_warm_heap_serves_each_batch_without_fresh_page_faults():
    """By default glibc gives a batch's freed temporaries back to the OS, so the next batch
    faults every page in again; with the heap kept warm only the first batch does."""

    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _BATCHES, mode], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parents[1])
        return [int(n) for n in out.stdout.split()]

    pages = 40 * 4 * 2**20 // resource.getpagesize()
    cold, warm = faults("cold"), faults("warm")
    assert all(n > pages // 2 for n in cold[1:]), cold
    assert warm[0] > pages // 2 and all(n < pages // 20 for n in warm[1:]), warm


def test_heap_settings_are_left_alone_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    host_memory._glibc.cache_clear()
    try:
        assert host_memory.keep_heap_warm() is False
        assert host_memory.trim_host_memory() is False
    finally:
        monkeypatch.undo()
        host_memory._glibc.cache_clear()
