"""Benchmark: scoring memory with a 128k vocabulary, full logits versus chunked scoring.

Builds a tiny random LLaMA-architecture model with a 128,256-token vocabulary (hidden size
64, 2 layers; the output head is what matters here) and scores windows of 2,048 tokens in
three ways: through whole-batch logits (the path a model takes when its head's output is
changed after the head, e.g. soft-capped), through the head's weight a slice of the
vocabulary at a time (a plain linear head), and through the head module a chunk of positions
at a time (any other head: quantized, offloaded). Each mode runs in its own process, so each
peak RSS is that mode's own. Prints, per mode, the batch size chosen, the peak RSS, the
growth of RSS during evaluation, tokens/s, and checks that all modes give the same
per-window NLL.

    python benchmarks/chunked_scoring.py [--windows 8] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 128_256
ROOT = Path(__file__).resolve().parents[1]  # the invarlock tree this script belongs to
MODES = {"full": "whole-batch logits",
         "slices": "vocabulary slices (a plain linear head)",
         "positions": "chunks of positions (a head that cannot be sliced)"}


def child(mode: str, windows: int, seq_len: int) -> None:
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from invarlock import evaluate
    from invarlock.evaluation import sliced_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=seq_len, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(windows, seq_len), dtype=np.int64)

    class Set:
        window_ids = np.arange(windows, dtype=np.int64)
        input_ids = ids
        attention_mask = np.ones_like(ids)
        labels = None
        token_type_ids = None
        sha256 = tuple(str(i) for i in range(windows))

    if mode == "full":
        evaluate._chunkable_head = lambda *_args: None  # score through whole-batch logits
    if mode == "positions":
        sliced_head._linear_parameters = lambda _head: None  # as for a head that cannot be sliced
    size = evaluate.auto_batch_size(model, windows, seq_len, "cpu",
                                    full_logits=mode == "full")
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    scores = evaluate.evaluate_windows(model, Set(), kind="ppl_causal", device="cpu")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "batch": size, "rss_before": before, "peak": peak,
                      "seconds": seconds, "tokens": int(scores.tokens.sum()),
                      "values": scores.values.tolist()}))


def run(mode: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--windows",
                          str(args.windows), "--seq-len", str(args.seq_len)],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        sys.exit(f"{mode} run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.windows, args.seq_len)
        return
    mib = 1 / 2**20
    print(f"tiny LLaMA, vocabulary {VOCAB:,}, {args.windows} windows x {args.seq_len} tokens, "
          f"CPU ({os.cpu_count()} visible)")
    results = {mode: run(mode, args) for mode in MODES}
    for mode, r in results.items():
        print(f"{MODES[mode]}:")
        print(f"  batch size          {r['batch']}")
        print(f"  peak RSS            {r['peak'] * mib:,.0f} MiB")
        print(f"  RSS growth in eval  {(r['peak'] - r['rss_before']) * mib:,.0f} MiB")
        print(f"  evaluation          {r['tokens'] / r['seconds']:,.0f} tokens/s")
    full = np.array(results["full"]["values"])
    for mode in ("slices", "positions"):
        values = np.array(results[mode]["values"])
        rel = float(np.max(np.abs(values - full) / np.abs(full)))
        ratio = results[mode]["peak"] / results["full"]["peak"]
        print(f"{mode}: per-window NLL vs whole logits, largest relative difference {rel:.2e}; "
              f"peak RSS / whole logits {ratio:.2f}")


if __name__ == "__main__":
    main()
