"""glibc's heap, tuned for a certification run that owns its process.

Two opposite needs. Evaluation frees each batch's activations (a few MiB apiece) and asks
for the same again for the next batch: glibc's defaults hand them back to the OS and fault
them in afresh, so the heap is kept warm (`keep_heap_warm`). But memory that is free and
kept is still resident: a model that leaves, and the guards' matrix copies (megabytes
apiece, hundreds of them, with small results kept between them, so that the freed holes
are split and not reused: SmolLM2-135M's 211 matrices grew the process by 200 MB) are
handed back explicitly (`trim_host_memory`: after each model, after each weight stage, and
every few dozen matrices within one). Data kept across batches stays off the
heap instead (`invarlock.guards.measure.sketch.RowStore`): small arrays kept between the
freed activations fragment it. Elsewhere (macOS, musl) every call here is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# glibc's mallopt parameters (malloc.h) and the values evaluation runs under
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit: blocks below come from the heap
HEAP_TRIM_THRESHOLD = 2**30  # free memory kept at the top of the heap before it goes back


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, for its allocator's entry points; None off Linux or on another C library
    (musl), whose allocator has neither knob."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def keep_heap_warm() -> bool:
    """Keep freed batch temporaries in the heap for the next batch; True where glibc took it.

    By default glibc maps blocks above a moving threshold straight from the OS and unmaps them
    on free, and hands the top of the heap back once 128 KiB or more lies free there, so each
    batch's activations (a few MiB apiece) can be faulted in afresh: on CPU that was 170,000
    page faults and a tenth of the time of every SmolLM2 batch. Fixed thresholds keep them;
    memory goes back to the OS explicitly (`trim_host_memory`). The setting is process-wide
    and lasts, which suits a certification run that owns its process.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
                                     and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


def trim_host_memory() -> bool:
    """Hand every free page of every heap back to the OS; False where that cannot be done."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
