"""SHA-256 digests of weights, hashed a piece at a time on every core.

One sha256 stream runs at about 2 GB/s on one core, so a 7B checkpoint (14 GB in bfloat16)
took 7 s a pass: hashing the baseline's files, the subject's files and the subject's tensors
before and after evaluation cost longer than evaluating both models on a GPU. Here each piece
of at most `PIECE_BYTES` is hashed on its own, on a thread pool (reads, copies and hashlib all
release the GIL), and the digest is sha256 over the items in order: each file's or tensor's
header bytes, then its pieces' 32-byte sha256 digests.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from invarlock.errors import InputError

PIECE_BYTES = 16 * 2**20
MAX_WORKERS = 8  # pieces queued ahead: 4x this, so at most 528 MiB of host copies

Piece = Callable[[], bytes]  # hashes one piece, returns its sha256 digest
Part = bytes | Piece  # header bytes go into the digest as they are


def hash_workers() -> int:
    """Threads for hashing: the cores this process may use, at most `MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def piece_bounds(size: int, piece: int | None = None) -> Iterator[tuple[int, int]]:
    """(offset, length) of each piece of `size` bytes; none for an empty item."""
    piece = piece or PIECE_BYTES
    for offset in range(0, size, piece):
        yield offset, min(piece, size - offset)


def tree_sha256(parts: Iterable[Part]) -> str:
    """``sha256:<hex>`` over `parts` in order, with each piece replaced by its digest."""
    outer = hashlib.sha256()
    workers = hash_workers()
    pending: deque[bytes | Future[bytes]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="invarlock-hash") as pool:
        try:
            for part in parts:
                pending.append(part if isinstance(part, bytes) else pool.submit(part))
                while len(pending) > 4 * workers:  # queue ahead, not the whole model
                    outer.update(_taken(pending.popleft()))
            while pending:
                outer.update(_taken(pending.popleft()))
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()
    return f"sha256:{outer.hexdigest()}"


def _taken(item: bytes | Future[bytes]) -> bytes:
    return item if isinstance(item, bytes) else item.result()


_buffers = threading.local()


def _buffer(size: int) -> memoryview:
    """This thread's read buffer, reused from piece to piece."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = bytearray(max(size, PIECE_BYTES))
    return memoryview(buf)[:size]


def file_pieces(path: Path, size: int) -> Iterator[Piece]:
    """Jobs hashing `path` a piece at a time; `size` is what its header promised."""

    def piece(offset: int, length: int) -> Piece:
        def job() -> bytes:
            view = _buffer(length)
            with path.open("rb") as handle:
                handle.seek(offset)
                got = handle.readinto(view)
            if got != length:
                raise InputError(f"{path} changed while it was being read (hash it again)")
            return hashlib.sha256(view).digest()

        return job

    for offset, length in piece_bounds(size):
        yield piece(offset, length)
