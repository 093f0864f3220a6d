"""Check the bundled demo model: held-out perplexity, INT8 passes, 2-bit is catastrophic.

Loads the demo checkpoint and corpus offline, cuts the corpus the way certification does
(documents tokenized without special tokens, joined by EOS, non-overlapping 128-token windows,
duplicates dropped) and reports the perplexity of the model and of copies whose attention and
MLP weights are fake-quantized with symmetric per-output-channel round-to-nearest (RTN).

Acceptance (exit 0 when both hold, else 1):
  * INT8:  PPL_q / PPL <= --int8-limit (1.01)
  * 2-bit: PPL_q / PPL >  --low-bit-floor (2.0)
and the corpus must yield at least --min-windows (1,000) unique windows.

Usage: python scripts/check_demo_model.py [--max-windows N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from invarlock import demo  # noqa: E402
from scripts.train_demo_model import cut_windows, token_stream  # noqa: E402

logger = logging.getLogger("check_demo_model")


def load_demo(model_dir: Path):
    """Tokenizer and fp32 model from a local directory: offline, safetensors, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                              trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                 trust_remote_code=False, use_safetensors=True,
                                                 dtype=torch.float32)
    return tokenizer, model.eval()


def corpus_windows(tokenizer, documents: Sequence[str], seq_len: int) -> torch.Tensor:
    """Unique non-overlapping windows [N, seq_len] of the EOS-joined token stream, cut as the
    training script cuts them."""
    return cut_windows(token_stream(tokenizer, documents), seq_len)


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per-window next-token NLL sums (nats), float64 [N]; T-1 scored tokens per window."""
    sums = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()                # [B, T-1, V]
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        sums.append(nll.double().sum(dim=1))                                   # [B]
    return torch.cat(sums)


def quantizable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Attention and MLP projections (Conv1D or Linear); embeddings and the head are kept."""
    from transformers.pytorch_utils import Conv1D

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, Conv1D | torch.nn.Linear)
            and (".attn." in name or ".mlp." in name)]


@torch.no_grad()
def fake_quant_rtn(model: torch.nn.Module, bits: int) -> int:
    """Symmetric per-output-channel RTN in place: s = max|w| / qmax per output channel,
    q = clamp(round(w / s), -qmax, qmax), w <- q * s. Conv1D weights are [in, out] (a channel
    is a column); Linear weights are [out, in] (a row). Returns the number of modules edited."""
    from transformers.pytorch_utils import Conv1D

    qmax = 2 ** (bits - 1) - 1
    modules = quantizable(model)
    for _, module in modules:
        w = module.weight
        in_dim = 0 if isinstance(module, Conv1D) else 1
        scale = w.abs().amax(dim=in_dim, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        w.copy_(torch.clamp(torch.round(w / scale), -qmax, qmax) * scale)
    return len(modules)


@dataclass(frozen=True)
class QuantCheck:
    bits: int
    modules: int
    ppl: float
    ratio: float        # PPL_q / PPL on the same windows = exp(mean paired NLL delta)


@dataclass(frozen=True)
class DemoCheck:
    seq_len: int
    windows: int
    tokens_scored: int
    ppl: float
    quant: tuple[QuantCheck, ...]
    seconds: float


def check(model_dir: Path, seq_len: int, bits: Sequence[int], max_windows: int | None,
          batch_size: int) -> DemoCheck:
    started = time.perf_counter()
    tokenizer, model = load_demo(model_dir)
    windows = corpus_windows(tokenizer, demo.read_documents(), seq_len)
    available = windows.shape[0]
    if max_windows is not None:
        windows = windows[:max_windows]
    tokens = windows.shape[0] * (seq_len - 1)
    base = window_nll(model, windows, batch_size)
    ppl = math.exp(base.sum().item() / tokens)
    logger.info("%d unique %d-token windows; evaluating %d (%d tokens)", available, seq_len,
                windows.shape[0], tokens)
    logger.info("baseline      ppl %9.3f", ppl)
    results = []
    for b in bits:
        edited = copy.deepcopy(model)
        n = fake_quant_rtn(edited, b)
        nll = window_nll(edited, windows, batch_size)
        ratio = math.exp((nll.sum() - base.sum()).item() / tokens)
        results.append(QuantCheck(bits=b, modules=n, ppl=ppl * ratio, ratio=ratio))
        logger.info("RTN %d-bit     ppl %9.3f  ratio %.4f  (%d modules)", b, ppl * ratio,
                    ratio, n)
    return DemoCheck(seq_len=seq_len, windows=available, tokens_scored=tokens, ppl=ppl,
                     quant=tuple(results), seconds=time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=demo.model_dir())
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate only the first N windows (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--int8-limit", type=float, default=1.01)
    parser.add_argument("--low-bit-floor", type=float, default=2.0)
    parser.add_argument("--min-windows", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    result = check(args.model_dir, args.seq_len, (8, 2), args.max_windows, args.batch_size)
    int8, low = result.quant
    verdicts = {
        f"unique windows {result.windows} >= {args.min_windows}":
            result.windows >= args.min_windows,
        f"INT8 ratio {int8.ratio:.4f} <= {args.int8_limit}": int8.ratio <= args.int8_limit,
        f"2-bit ratio {low.ratio:.3f} > {args.low_bit_floor}": low.ratio > args.low_bit_floor,
    }
    for line, ok in verdicts.items():
        logger.info("%s  %s", "ok  " if ok else "FAIL", line)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
