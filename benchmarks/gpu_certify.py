"""One certification on a CUDA device, measured from inside the process.

Runs `invarlock certify` in-process (so that torch's CUDA allocator statistics are this
run's) and prints one JSON line: wall time, evaluation tokens/s, peak GPU memory allocated
and reserved, the device and the verdict. `benchmarks/gpu.sh` calls it per model and dtype.

    python benchmarks/gpu_certify.py --baseline DIR --dtype bfloat16 --profile ci --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path


def make_gpt2_small(out: Path, tokenizer_dir: Path) -> None:
    """A GPT-2-small-size model (12 layers, 768 wide, 12 heads, 1024 positions), random
    weights, with the tokenizer of ``tokenizer_dir``: the architecture's cost, offline."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=768, n_layer=12,
                        n_head=12, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--profile", default="ci")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--preset", type=Path, help="config file merged into the run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--make-gpt2-small", nargs=2, type=Path, metavar=("OUT", "TOKENIZER"))
    args = parser.parse_args()
    if args.make_gpt2_small:
        return make_gpt2_small(*args.make_gpt2_small)
    import torch

    from invarlock.cli import main as cli

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("CUDA is not available here")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    extra = ["--preset", str(args.preset)] if args.preset else []
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # certify's summary: not our row
            cli(["certify", "--baseline", str(args.baseline), "--edit", "quant_rtn",
                 "--dataset", args.dataset, "--profile", args.profile, "--device", args.device,
                 "--dtype", args.dtype, "--out", str(args.out), "--no-cache", "--json",
                 "--quiet", *extra], standalone_mode=False)
    except SystemExit as exc:  # click exits only on errors in this mode
        if exc.code not in (0, 1, None):
            raise
    wall = time.perf_counter() - start
    cert = json.loads((args.out / "evaluation.cert.json").read_text())
    timings = cert["timings"]
    seconds = sum(v for k, v in timings.items() if k.endswith("_eval_s"))
    tokens = sum(sum(cert["windows"][name]["tokens"]) * (1 + bool(cert["windows"][name]["subject"]))
                 for name in ("preview", "final"))
    row = {"model": cert["baseline"]["architecture"], "parameters": cert["baseline"]["parameters"],
           "dtype": cert["baseline"]["dtype"], "profile": args.profile,
           "windows": [cert["pairing"]["preview_n"], cert["pairing"]["final_n"]],
           "seq_len": cert["windows"]["seq_len"],
           "device": cert["environment"].get("device", {}).get("name"),
           "wall_s": round(wall, 1),
           "eval_tokens_per_s": round(tokens / seconds) if seconds else None,
           "verdict": cert["verdict"]["status"]}
    if cuda:
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
