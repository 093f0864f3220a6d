"""Benchmark: the cost of distribution evidence (KL divergence, top-token agreement, Δp).

Scores the bundled demo model (the baseline) and its 4-bit round-to-nearest copy (the
subject) on windows of the demo corpus, with distribution evidence off (per-window NLL only)
and on (the baseline keeps its top-k log-probabilities per scored token, the subject is
compared with them), in alternation so that both modes see the same machine load. Two runs
are timed: a cold one (baseline and subject evaluated) and a cached one (the baseline's
results, and with evidence its compact distribution, come from the cache: only the subject is
evaluated). For each: the fastest wall time of the repeats (on a shared machine the least
disturbed run), the process CPU time (which descheduling does not inflate) and the extra
cost of evidence; then the peak RSS of each run in its own process, as `certify` sets up its
heap (`keep_heap_warm`). Last, a memory check with a 128k vocabulary: the growth of RSS while
a tiny LLaMA's baseline and subject are scored with evidence on, at two vocabulary sizes.

The demo model is the worst case for the relative cost: its output head (vocabulary 2,048,
hidden size 128) is a large share of its forward pass, and the top-k selection is paid per
vocabulary entry.

    python benchmarks/distribution_evidence.py [--windows 32] [--seq-len 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.child import run_child  # noqa: E402

RUNS = ("cold", "cached")
WIDE_VOCABS = (32_000, 128_256)


class _Set:
    """A window set over the given ids (every token attended)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.input_ids = ids
        self.window_ids = np.arange(ids.shape[0], dtype=np.int64)
        self.attention_mask = np.ones_like(ids)
        self.labels = None
        self.token_type_ids = None
        self.sha256 = tuple(str(i) for i in range(ids.shape[0]))


def _rtn4(model):
    import torch

    subject = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in subject.named_parameters():
            if p.ndim == 2 and "wte" not in name and "wpe" not in name:
                step = p.abs().amax(dim=1, keepdim=True) / 7
                p.copy_((p / step).round().clamp(-8, 7) * step)
    return subject


def _setup(windows: int, seq_len: int):
    from invarlock.host_memory import keep_heap_warm
    from invarlock.models.loading import load_model
    from invarlock.models.source import resolve_model_source

    keep_heap_warm()  # as certify runs evaluation
    demo = ROOT / "invarlock" / "demo"
    loaded = load_model(resolve_model_source(str(demo / "model")))
    with gzip.open(demo / "corpus.txt.gz", "rt") as f:
        ids = np.asarray(loaded.tokenizer(f.read())["input_ids"], dtype=np.int64)
    ids = ids[:windows * seq_len].reshape(windows, seq_len)
    return loaded.model, _rtn4(loaded.model), _Set(ids)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def _pass(base, subject, windows, on: bool, cached=None):
    """One run: the baseline (skipped when `cached` holds its compact form), then the
    subject. Returns the scores and (wall, cpu) seconds per part."""
    from invarlock import distribution
    from invarlock.evaluate import evaluate_windows

    def score(model, spec):
        return evaluate_windows(model, windows, kind="ppl_causal", device="cpu",
                                distribution=spec if on else None)

    b, base_t = (None, (0.0, 0.0)) if cached is not None else _timed(
        lambda: score(base, distribution.TOP_K))
    reference = cached if cached is not None else (b.distribution if on else None)
    s, subj_t = _timed(lambda: score(subject, reference))
    return b, s, base_t, subj_t


def child(args: argparse.Namespace) -> None:
    """One run in its own process (for its peak RSS)."""
    mode, run = args.child.split("-")
    base, subject, windows = _setup(args.windows, args.seq_len)
    cached = None
    if run == "cached" and mode == "on":
        from invarlock.distribution import CompactDistribution

        cached = CompactDistribution.from_json(json.loads(Path(args.compact).read_text()))
    if run == "cached" and mode == "off":
        _pass(subject, subject, windows, False, cached=object())  # the subject alone
        return
    _pass(base, subject, windows, mode == "on", cached=cached)


def wide_child(vocab: int, on: bool, windows: int, seq_len: int) -> None:
    """Baseline capture and subject comparison on a tiny LLaMA with a wide vocabulary."""
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from invarlock.host_memory import keep_heap_warm

    keep_heap_warm()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=seq_len, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    ids = np.random.default_rng(0).integers(0, vocab, size=(windows, seq_len), dtype=np.int64)
    subject = _rtn4(base)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    _, s, _, _ = _pass(base, subject, _Set(ids), on)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kld = float(s.distribution.kld.mean()) if on else None
    print(json.dumps({"growth": peak - before, "peak": peak, "seconds": seconds,
                      "tokens": 2 * int(s.tokens.sum()), "kld": kld}))


def _fastest(times: list[tuple[tuple[float, float], tuple[float, float]]], which: int,
             part: str) -> float:
    def total(t):
        base, subj = t
        return {"cold": base[which] + subj[which], "cached": subj[which]}[part]
    return min(total(t) for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--wide-windows", type=int, default=4)
    parser.add_argument("--wide-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--compact", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child and args.child.startswith("wide"):
        _, vocab, mode = args.child.split("-")
        wide_child(int(vocab), mode == "on", args.wide_windows, args.wide_seq_len)
        return
    if args.child:
        child(args)
        return
    from invarlock import distribution

    base, subject, windows = _setup(args.windows, args.seq_len)
    b, _, _, _ = _pass(base, subject, windows, True)  # warm-up: first-touch allocations
    compact = b.distribution
    times: dict[str, list] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            b, s, base_t, subj_t = _pass(base, subject, windows, mode == "on")
            times[mode].append((base_t, subj_t))
    tokens = int(s.tokens.sum())
    print(f"demo model (GPT-2, vocabulary {base.config.vocab_size:,}) vs its 4-bit RTN copy, "
          f"{args.windows} windows x {args.seq_len} tokens, CPU ({os.cpu_count()} visible, "
          f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}), fastest "
          f"of {args.repeats} alternating rounds")
    print("  run                      wall off   wall on   extra    CPU off    CPU on   extra")
    for run, label in (("cold", "cold (baseline+subject)"), ("cached", "cached (subject only)")):
        off, on = (_fastest(times["off"], 0, run), _fastest(times["on"], 0, run))
        coff, con = (_fastest(times["off"], 1, run), _fastest(times["on"], 1, run))
        print(f"  {label:<24} {off:7.2f} s {on:7.2f} s {100 * (on / off - 1):+6.1f}%  "
              f"{coff:7.2f} s {con:7.2f} s {100 * (con / coff - 1):+6.1f}%")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = ["--windows", str(args.windows), "--seq-len", str(args.seq_len),
              "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        stored = Path(tmp) / "compact.json"
        stored.write_text(json.dumps(compact.to_json()))
        peaks = {}
        for run in RUNS:
            for mode in ("off", "on"):
                child_run = run_child([sys.executable, __file__, "--child", f"{mode}-{run}",
                                       "--compact", str(stored), *common], env=env)
                if child_run.code != 0:
                    sys.exit(f"{mode}-{run} run failed:\n{child_run.stderr}")
                peaks[mode, run] = child_run.peak
            print(f"  peak RSS, {run:<6}        evidence off {peaks['off', run] / 2**20:,.0f} MiB"
                  f", on {peaks['on', run] / 2**20:,.0f} MiB "
                  f"({peaks['on', run] / peaks['off', run]:.3f}x)")
        size = stored.stat().st_size
    print(f"  compact baseline form      k = {compact.k}, {size / tokens:,.0f} bytes per "
          f"scored token in the cache ({size / 2**20:.1f} MiB for {tokens:,} tokens)")
    summary = distribution.summarize(s.distribution, set_name="final", top_k=compact.k,
                                     limits=distribution.Limits(), replicates=1000, seed=0,
                                     alpha=0.05)
    print(f"  mean KLD {summary['kld_mean']['estimate']:.6f} "
          f"(CI {summary['kld_mean']['low']:.6f} to {summary['kld_mean']['high']:.6f}), "
          f"99.9% KLD {summary['kld']['p99_9']:.4f}, same top p "
          f"{100 * summary['same_top_p']['estimate']:.2f}%")
    _wide(args, env)


def _wide(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Scoring memory against the vocabulary: RSS growth during evaluation."""
    print(f"tiny LLaMA (hidden size 64), {args.wide_windows} windows x {args.wide_seq_len} "
          f"tokens, baseline capture then subject comparison:")
    for vocab, mode in [(v, "on") for v in WIDE_VOCABS] + [(WIDE_VOCABS[-1], "off")]:
        run = run_child([sys.executable, __file__, "--child", f"wide-{vocab}-{mode}",
                         "--wide-windows", str(args.wide_windows), "--wide-seq-len",
                         str(args.wide_seq_len), "--threads", str(args.threads)], env=env)
        if run.code != 0:
            sys.exit(f"vocabulary {vocab} run failed:\n{run.stderr}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        kld = "" if r["kld"] is None else f", mean KLD {r['kld']:.4f}"
        print(f"  vocabulary {vocab:>7,}, evidence {mode:<3}  RSS growth in evaluation "
              f"{r['growth'] / 2**20:6,.0f} MiB, peak {r['peak'] / 2**20:,.0f} MiB, "
              f"{r['tokens'] / r['seconds']:,.0f} tokens/s{kld}")


if __name__ == "__main__":
    main()
