"""Benchmark: the cost of distribution evidence (KL divergence, top-token agreement, Δp).

Scores the bundled demo model (the baseline) and its 4-bit round-to-nearest copy (the
subject) on windows of the demo corpus, with distribution evidence off (per-window NLL only)
and on (the baseline keeps its top-k log-probabilities per scored token, the subject is
compared with them), in alternation so that both modes see the same machine load. Prints the
fastest of the repeats per mode and part (on a shared machine the least disturbed run; the
median follows load spikes), the extra time, the peak RSS of each mode (each in its own
process), the compact form's size and the evidence itself.

    python benchmarks/distribution_evidence.py [--windows 64] [--seq-len 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.child import run_child  # noqa: E402


def _setup(windows: int, seq_len: int):
    import torch

    from invarlock.models.loading import load_model
    from invarlock.models.source import resolve_model_source

    demo = ROOT / "invarlock" / "demo"
    loaded = load_model(resolve_model_source(str(demo / "model")))
    with gzip.open(demo / "corpus.txt.gz", "rt") as f:
        ids = np.asarray(loaded.tokenizer(f.read())["input_ids"], dtype=np.int64)
    ids = ids[:windows * seq_len].reshape(windows, seq_len)
    subject = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for name, p in subject.named_parameters():
            if p.ndim == 2 and "wte" not in name and "wpe" not in name:
                step = p.abs().amax(dim=1, keepdim=True) / 7
                p.copy_((p / step).round().clamp(-8, 7) * step)

    class Set:
        window_ids = np.arange(windows, dtype=np.int64)
        input_ids = ids
        attention_mask = np.ones_like(ids)
        labels = None
        token_type_ids = None
        sha256 = tuple(str(i) for i in range(windows))

    return loaded.model, subject, Set()


def _pass(base, subject, windows, on: bool):
    from invarlock import distribution
    from invarlock.evaluate import evaluate_windows

    start = time.perf_counter()
    b = evaluate_windows(base, windows, kind="ppl_causal", device="cpu",
                         distribution=distribution.TOP_K if on else None)
    middle = time.perf_counter()
    s = evaluate_windows(subject, windows, kind="ppl_causal", device="cpu",
                         distribution=b.distribution if on else None)
    return (middle - start, time.perf_counter() - middle), b, s


def child(mode: str, args: argparse.Namespace) -> None:
    """One mode in its own process (for its peak RSS): one pass."""
    base, subject, windows = _setup(args.windows, args.seq_len)
    _pass(base, subject, windows, mode == "on")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default)")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return
    from invarlock import distribution

    base, subject, windows = _setup(args.windows, args.seq_len)
    _pass(base, subject, windows, True)  # warm-up: first-touch allocations, kernels
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            seconds, b, s = _pass(base, subject, windows, mode == "on")
            times[mode].append(seconds)
    tokens = int(b.tokens.sum())
    print(f"demo model (GPT-2, vocabulary {base.config.vocab_size:,}) vs its 4-bit RTN copy, "
          f"{args.windows} windows x {args.seq_len} tokens, CPU ({os.cpu_count()} visible, "
          f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}), fastest "
          f"of {args.repeats} alternating rounds")
    print("                               evidence off   evidence on   extra")
    for i, part in enumerate(("baseline (capture, cached)", "subject (compare, each run)",
                              "both")):
        off = min(sum(t) if i == 2 else t[i] for t in times["off"])
        on = min(sum(t) if i == 2 else t[i] for t in times["on"])
        print(f"  {part:<28} {off:8.2f} s    {on:8.2f} s   {100 * (on / off - 1):+5.1f}%")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for mode in ("off", "on"):
        run = run_child([sys.executable, __file__, "--child", mode, "--windows",
                         str(args.windows), "--seq-len", str(args.seq_len)], env=env)
        if run.code != 0:
            sys.exit(f"{mode} run failed:\n{run.stderr}")
        print(f"  peak RSS, evidence {mode:<3}     {run.peak / 2**20:,.0f} MiB")
    compact = b.distribution
    stored = len(json.dumps(compact.to_json()))
    print(f"  compact baseline form      k = {compact.k}, {stored / tokens:,.0f} bytes per "
          f"scored token in the cache ({stored / 2**20:.1f} MiB for {tokens:,} tokens)")
    summary = distribution.summarize(s.distribution, set_name="final", top_k=compact.k,
                                     limits=distribution.Limits(), replicates=1000, seed=0,
                                     alpha=0.05)
    print(f"  mean KLD {summary['kld_mean']['estimate']:.6f} "
          f"(CI {summary['kld_mean']['low']:.6f} to {summary['kld_mean']['high']:.6f}), "
          f"99.9% KLD {summary['kld']['p99_9']:.4f}, same top p "
          f"{100 * summary['same_top_p']['estimate']:.2f}%")


if __name__ == "__main__":
    main()
