"""Benchmark: weight digests in pieces on every core versus one sha256 stream.

A certification hashes the baseline's weight files, the subject's files, and the subject's
tensors before and after evaluation. On a checkpoint's files (`--model`, default SmolLM2-135M
after `make smollm2`) and on that model loaded as float32 tensors, this prints, in one run,
the seconds and GB/s of one sha256 stream over the same bytes and of InvarLock's digests
(`weights_digest` with the in-memory memo bypassed, `tensor_digest`), best of `--repeat`,
and their ratio. The files are read once first so that both read from the page cache.

    python benchmarks/digests.py [--model .cache/models/smollm2-135m] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from invarlock.models import hashing, loading, source  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def stream_files(files: list[Path]) -> None:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)


def unique_tensors(model) -> list:
    """The state dict's tensors, tied weights once (as tensor_digest hashes them)."""
    seen, out = set(), []
    for _, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out.append(tensor)
    return out


def stream_tensors(model) -> None:
    digest = hashlib.sha256()
    for tensor in unique_tensors(model):
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).numpy().data)


def pieces_files(files: list[Path]) -> None:
    source._DIGESTS.clear()  # the memo would answer the second call from memory
    source.weights_digest(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".cache/models/smollm2-135m")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    src = source.resolve_model_source(str(args.model))
    files = source.weight_files(src)
    file_bytes = sum(p.stat().st_size for p in files)
    stream_files(files)  # into the page cache
    loaded = loading.load_model(src, device="cpu", dtype="float32")
    tensor_bytes = sum(t.numel() * t.element_size() for t in unique_tensors(loaded.model))
    print(f"{args.model.name}: {file_bytes / 1e9:.2f} GB of files, {tensor_bytes / 1e9:.2f} GB "
          f"of tensors; {hashing.hash_workers()} hash threads "
          f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} "
          f"cores), pieces of {hashing.PIECE_BYTES >> 20} MiB")
    rows = [("files", file_bytes, lambda: stream_files(files), lambda: pieces_files(files)),
            ("tensors", tensor_bytes, lambda: stream_tensors(loaded.model),
             lambda: loading.tensor_digest(loaded.model))]
    for label, size, stream, pieces in rows:
        one, many = best(stream, args.repeat), best(pieces, args.repeat)
        print(f"{label:8} one stream {one:.3f} s ({size / one / 1e9:.2f} GB/s); in pieces "
              f"{many:.3f} s ({size / many / 1e9:.2f} GB/s); pieces / stream {many / one:.2f}")


if __name__ == "__main__":
    main()
