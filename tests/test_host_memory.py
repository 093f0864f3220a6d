"""Free heap pages handed back to the system: the tapped passes and the guards' weight stages
call `release_free_memory`, and on glibc it returns memory that plain `free` keeps."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from invarlock import evaluate as evaluate_module
from invarlock import host_memory
from tests.test_evaluate import CAUSAL, RecordingTap, causal_windows, gpt2, run  # noqa: F401

PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


@pytest.mark.skipif(host_memory._malloc_trim() is None, reason="needs glibc's malloc_trim")
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
        assert host_memory.release_free_memory() is True
        after = _resident_bytes()
    finally:
        libc.free(pin)
    assert before - after > chunk * count // 2, (before, after)


def test_a_tapped_pass_on_the_cpu_trims_after_every_batch(gpt2, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr(evaluate_module, "release_free_memory", lambda: calls.append(1))
    run(gpt2, causal_windows(n=6), CAUSAL, batch_size=4)
    assert calls == []  # an untapped pass keeps nothing between batches
    tapped = run(gpt2, causal_windows(n=6), CAUSAL, batch_size=4, taps=[RecordingTap()])
    assert np.isfinite(tapped.values).all()
    assert len(calls) == 2  # two batches


def test_the_guards_weight_stages_trim_even_when_a_probe_fails(monkeypatch):
    from invarlock.guards.measure import run as guard_run

    calls = []
    monkeypatch.setattr(guard_run, "release_free_memory", lambda: calls.append(1))
    owner = guard_run.GuardRun.__new__(guard_run.GuardRun)
    owner._timed = lambda name, fn, *args: fn(*args)

    def broken(_model):
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        owner._weights_stage("spectral", broken, object())
    assert calls == [1]
