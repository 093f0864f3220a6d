"""How many windows go through one forward pass, and how large the output head's pieces are.

Sizes come from a memory budget per device (512 MiB on CPU, 2 GiB on MPS, half the free
memory on CUDA): a rough bound on a window's activations and, when a batch's whole logits
exist, those logits; chunked scoring (``invarlock.evaluation.sliced_head``) takes its slice's
or chunk's logits off the budget first. Running out of memory anyway halves the batch.
"""

from __future__ import annotations

import logging
from typing import Any

from invarlock.enums import MetricKind
from invarlock.errors import InputError, MissingExtraError

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
    raise MissingExtraError("evaluating models") from exc

logger = logging.getLogger(__name__)

CPU_BUDGET_BYTES = 512 << 20    # per-batch temporaries on CPU (activations, logits, CE)
MPS_BUDGET_BYTES = 2 << 30
CUDA_BUDGET_FRACTION = 0.5      # of the free device memory, after the model is loaded
HEAD_BUDGET_SHARE = 8           # one head slice's or chunk's logits: 1/8 of the budget
CPU_SLICE_BYTES = 8 << 20       # float32 logits of one vocabulary slice on CPU (cache-sized)
CPU_SLICE_MIN_COLUMNS = 256     # narrower slices make the head's matmul inefficient
MAX_BATCH = {"mps": 128, "cuda": 256}  # windows; beyond these, throughput stops growing
# On CPU a pass over about a thousand tokens is already as fast per token as any larger one
# (SmolLM2-135M, 128-token windows: batches of 8, 16 and 32 take 13.2-14.0, 13.3-14.9 and
# 14.5-15.9 s for 64 windows); larger batches only add memory and cache misses.
CPU_BATCH_TOKENS = 1024


def auto_batch_size(
    model: torch.nn.Module, n: int, seq_len: int, device: str,
    *, kind: MetricKind = MetricKind.PPL_CAUSAL, full_logits: bool = True,
) -> int:
    """Windows per forward pass so the batch's temporaries stay within a memory budget.

    Per window: a rough bound on activations (12 hidden-size vectors and two heads x T x T
    attention maps per position) and, with ``full_logits`` (classifiers, and language
    models whose head cannot be scored in chunks), the logits (T x width in the model dtype,
    plus a float32 copy when that is narrower, the log-softmax inside cross-entropy, a
    finiteness mask). Chunked scoring keeps its logits to one vocabulary slice
    (``head_slice_columns``) or chunk of positions (``head_chunk_rows``), taken off the
    budget first. The budget is 512 MiB on CPU (where a batch also holds at most
    ``CPU_BATCH_TOKENS`` tokens), 2 GiB on MPS and half the free memory on CUDA.
    """
    config = getattr(model, "config", None)
    hidden = config_int(config, "hidden_size", "n_embd", "d_model", default=1024)
    heads = config_int(config, "num_attention_heads", "n_head", default=16)
    if kind is MetricKind.ACCURACY:
        width = config_int(config, "num_labels", default=2)
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        width = int(head.weight.shape[0]) if head is not None else config_int(
            config, "vocab_size", default=50_000)
    elem = next(model.parameters()).element_size()
    per_position = _logit_bytes(width, elem)
    per_window = 4 * seq_len * (12 * hidden + 2 * heads * seq_len)
    budget = _budget(device)
    if full_logits or kind is MetricKind.ACCURACY:
        per_window += seq_len * per_position
    else:
        budget -= budget // HEAD_BUDGET_SHARE
    base = device.split(":")[0]
    most = CPU_BATCH_TOKENS // seq_len if base == "cpu" else MAX_BATCH.get(base, 32)
    size = max(1, min(n, most, budget // max(per_window, 1)))
    logger.debug("auto batch size %d (%d windows of %d tokens on %s)", size, n, seq_len, device)
    return size


def head_chunk_rows(width: int, elem: int, device: str) -> int:
    """Positions per chunk of chunked scoring: their logits and losses fit 1/8 of the budget."""
    return max(1, (_budget(device) // HEAD_BUDGET_SHARE) // _logit_bytes(width, elem))


def head_slice_columns(rows: int, width: int, elem: int, device: str) -> int:
    """Vocabulary entries per slice of sliced scoring: ``rows`` positions' logits of one slice
    (in the model dtype, plus a float32 copy when that is narrower; exponentiated in place)
    fit 1/8 of the budget. On CPU a slice is also kept near the size of the last-level cache
    (its float32 logits ~8 MiB, at least 256 columns), so that log-sum-exp reads back what
    the matmul just wrote: that is faster than one matmul over the whole vocabulary."""
    per_column = max(rows, 1) * (elem + (4 if elem < 4 else 0))
    columns = (_budget(device) // HEAD_BUDGET_SHARE) // per_column
    if device.split(":")[0] == "cpu":
        columns = min(columns, max(CPU_SLICE_MIN_COLUMNS, CPU_SLICE_BYTES // (4 * max(rows, 1))))
    if columns > 64:
        columns -= columns % 64  # rows of whole cache lines: the kernels' vector loads align
    return max(1, min(width, columns))


def _logit_bytes(width: int, elem: int) -> int:
    """Bytes per scored position: logits in the model dtype, a float32 copy when that is
    narrower, the log-softmax inside cross-entropy, a finiteness flag."""
    return width * (elem + (4 if elem < 4 else 0) + 4 + 1)


def _budget(device: str) -> int:
    base = device.split(":")[0]
    if base == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * CUDA_BUDGET_FRACTION)
    if base == "mps":
        return MPS_BUDGET_BYTES
    return CPU_BUDGET_BYTES


def config_int(config: Any, *names: str, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text


def shrink_batch(size: int, seq_len: int, device: str, exc: BaseException) -> int:
    """Halve the batch after running out of memory; at one window, give up clearly."""
    if size <= 1:
        raise InputError(
            f"out of memory on {device} evaluating one window of {seq_len} tokens; "
            "use a smaller seq_len or another device"
        ) from exc
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    logger.warning("out of memory at batch size %d on %s; retrying with %d",
                   size, device, size // 2)
    return size // 2
