"""Evaluation windows: tokenize, cut, deduplicate, select, hash.

Both models of a comparison are scored on one `WindowPlan`, so they see identical token ids.

Language models (causal and masked)::

    documents ──tokenize (batch, fast tokenizer, no template tokens)──▶ ids per document
      ──join with EOS (causal) / SEP (masked)──▶ one stream of S tokens
      ──cut at 0, stride, 2·stride, … (no partial tail)──▶ candidate windows, id = cut index
      ──drop repeats of a window's content hash (first kept)──▶ `available` unique windows
      ──np.random.default_rng(seed).permutation──▶ preview = first P, final = next F

A causal window is `seq_len` stream tokens. A masked-LM window is `[CLS]` + `seq_len - 2`
stream tokens + `[SEP]`; its content is cut from the stream with step `stride - 2`, so with
`stride == seq_len` consecutive windows cover the stream without gap or overlap, as for causal.
MLM windows are then masked deterministically (`invarlock.data.masking`).

Classifiers: each labelled example is one window (template applied, truncated to `seq_len`),
deduplicated by (ids, label), selected the same way, and padded per set to its longest member.

Every window carries the sha256 of its unmasked ids as little-endian int64 bytes (classifier:
the ids, then the label as int64), so a certificate can prove which text was scored.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from invarlock.data.corpus import Corpus
from invarlock.data.masking import IGNORE_INDEX, MASK_SCHEME, mask_windows
from invarlock.enums import MetricKind
from invarlock.errors import EvidenceError, InputError

logger = logging.getLogger(__name__)

MIN_SET_SIZE = 2  # a shrunk set smaller than this cannot support a bootstrap interval


@dataclass(frozen=True, eq=False)
class WindowSet:
    """One evaluation set; arrays are shared by both models and must not be modified."""

    name: str                          # "preview" | "final"
    window_ids: np.ndarray             # int64 [N] cut index (LM) or example index (classifier)
    input_ids: np.ndarray              # int64 [N, T] fed to the model (MLM: already masked)
    attention_mask: np.ndarray         # int64 [N, T] ones for LM windows; 0 on classifier padding
    labels: np.ndarray | None          # MLM int64 [N, T] (-100 unscored); classifier int64 [N]
    token_type_ids: np.ndarray | None  # classifier, when the tokenizer produces them
    sha256: tuple[str, ...]            # per window, over the unmasked ids (+ label)

    @property
    def n(self) -> int:
        return int(self.window_ids.shape[0])

    def tokens_scored(self) -> np.ndarray:
        """int64 [N]: causal T-1 predicted tokens, MLM masked positions, classifier 1."""
        if self.labels is None:
            return self.attention_mask.sum(axis=1).astype(np.int64) - 1
        if self.labels.ndim == 2:
            return (self.labels != IGNORE_INDEX).sum(axis=1).astype(np.int64)
        return np.ones(self.n, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class WindowPlan:
    """The evidence layout of a run: which windows, in which sets, cut how, from what."""

    kind: MetricKind
    seq_len: int
    stride: int
    seed: int
    preview: WindowSet
    final: WindowSet
    available: int                 # unique windows (examples) the corpus yielded
    duplicates_dropped: int
    total_tokens: int              # tokens in the stream (classifier: in all examples)
    requested: tuple[int, int]     # (preview_n, final_n) asked for
    dataset_digest: str
    tokenizer_hash: str

    @property
    def shrunk(self) -> bool:
        """True when the corpus was too small and both sets were reduced (non-strict)."""
        return (self.preview.n, self.final.n) != self.requested

    @property
    def digest(self) -> str:
        """sha256 over the layout and the exact arrays fed to the models (masks included)."""
        record = {
            "kind": str(self.kind), "seq_len": self.seq_len, "stride": self.stride,
            "seed": self.seed, "tokenizer_hash": self.tokenizer_hash,
            "dataset_digest": self.dataset_digest,
            "mask_scheme": MASK_SCHEME if self.kind is MetricKind.PPL_MLM else None,
            "sets": [_set_record(s) for s in (self.preview, self.final)],
        }
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def tokens_seen(self) -> np.ndarray:
        """Sorted distinct token ids the evaluation windows contain, preview and final
        (padding excluded; a masked position by its original token)."""
        seen = []
        for s in (self.preview, self.final):
            seen.append(s.input_ids[s.attention_mask.astype(bool)])
            if s.labels is not None and s.labels.ndim == 2:
                seen.append(s.labels[s.labels != IGNORE_INDEX])
        return np.unique(np.concatenate(seen)).astype(np.int64) if seen else np.zeros(
            0, dtype=np.int64)

    def vocabulary_coverage(self, vocab_size: int) -> dict[str, Any]:
        """How much of the vocabulary the windows contain: the rest is never read by the
        primary metric, so damage to those rows shows only in the weights."""
        seen = self.tokens_seen()
        seen = int(np.count_nonzero((seen >= 0) & (seen < vocab_size)))
        return {"vocab_size": int(vocab_size), "tokens_seen": seen,
                "share": seen / vocab_size if vocab_size else 0.0}

    def overlap(self) -> float:
        """Fraction of final windows whose content also occurs in preview (must be 0.0)."""
        if self.final.n == 0:
            return 0.0
        seen = set(self.preview.sha256)
        return sum(h in seen for h in self.final.sha256) / self.final.n


@dataclass(frozen=True, eq=False)
class _Candidates:
    """All windows cut from a corpus, before deduplication and selection."""

    ids: list[np.ndarray]            # per window, unmasked and unpadded
    hashes: tuple[str, ...]
    labels: np.ndarray | None        # classifier labels
    token_types: list[np.ndarray] | None
    total_tokens: int


def plan_windows(corpus: Corpus, tokenizer: Any, *, kind: MetricKind | str, seq_len: int,
                 stride: int, preview_n: int, final_n: int, seed: int, strict: bool,
                 tokenizer_hash: str, profile: str | None = None) -> WindowPlan:
    """Cut, deduplicate and select the preview and final sets (see the module docstring).

    Too few unique windows: `strict` raises EvidenceError; otherwise both sets shrink to
    floor(available / 2) each (never above the request), and fewer than 2 each is an error.
    `profile` only names the profile in that message.
    """
    kind = MetricKind(kind)
    _check_arguments(kind, seq_len, stride, preview_n, final_n, seed)
    if kind is MetricKind.ACCURACY:
        cands = _example_candidates(corpus, tokenizer, seq_len)
    else:
        cands = _stream_candidates(corpus, tokenizer, kind, seq_len, stride)
    keep = first_unique(cands.hashes)
    n_preview, n_final = _set_sizes(kind, len(keep), seq_len, preview_n, final_n, strict,
                                    profile)
    order = keep[np.random.default_rng(seed).permutation(len(keep))]
    chosen = (order[:n_preview], order[n_preview:n_preview + n_final])
    sets = [_build_set(name, idx, cands, kind, tokenizer, seed)
            for name, idx in zip(("preview", "final"), chosen, strict=True)]
    plan = WindowPlan(kind, seq_len, stride, seed, sets[0], sets[1], available=len(keep),
                      duplicates_dropped=len(cands.hashes) - len(keep),
                      total_tokens=cands.total_tokens, requested=(preview_n, final_n),
                      dataset_digest=corpus.digest, tokenizer_hash=tokenizer_hash)
    logger.info("windows: %d unique of %d cut (%d duplicates), preview %d + final %d, %s",
                plan.available, len(cands.hashes), plan.duplicates_dropped, plan.preview.n,
                plan.final.n, plan.digest)
    return plan


def token_stream(documents: Sequence[str], tokenizer: Any, separator_id: int) -> np.ndarray:
    """Documents → one int64 stream with `separator_id` between consecutive documents."""
    encoded = _encode(tokenizer, documents)
    if not encoded:
        return np.zeros(0, dtype=np.int64)
    lengths = np.fromiter((len(x) for x in encoded), dtype=np.int64, count=len(encoded))
    content = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64,
                          count=int(lengths.sum()))
    stream = np.full(int(lengths.sum()) + len(encoded) - 1, separator_id, dtype=np.int64)
    is_content = np.ones(stream.size, dtype=bool)
    is_content[np.cumsum(lengths[:-1] + 1) - 1] = False  # the slot after each document but last
    stream[is_content] = content
    return stream


def cut_windows(stream: np.ndarray, length: int, step: int) -> np.ndarray:
    """Windows stream[s : s+length] for s = 0, step, 2·step, …; a partial tail is dropped."""
    count = (stream.size - length) // step + 1 if stream.size >= length else 0
    starts = np.arange(count, dtype=np.int64) * step
    return stream[starts[:, None] + np.arange(length, dtype=np.int64)]  # [count, length]


def window_sha256(ids: np.ndarray, label: int | None = None) -> str:
    """Hex sha256 of the ids as little-endian int64 bytes (then the label, if any)."""
    h = hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    if label is not None:
        h.update(np.asarray([label], dtype="<i8").tobytes())
    return h.hexdigest()


def first_unique(hashes: Sequence[str]) -> np.ndarray:
    """Indices of the first occurrence of each hash, in order."""
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first.setdefault(h, i)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


# --- candidates ------------------------------------------------------------------------------

def _stream_candidates(corpus: Corpus, tokenizer: Any, kind: MetricKind, seq_len: int,
                       stride: int) -> _Candidates:
    if kind is MetricKind.PPL_CAUSAL:
        eos = _special_id(tokenizer, "eos_token_id", "join documents into one stream",
                          required=len(corpus.documents) > 1)
        stream = token_stream(corpus.documents, tokenizer, eos)
        windows = cut_windows(stream, seq_len, stride)
    else:
        cls = _special_id(tokenizer, "cls_token_id", "frame masked-LM windows")
        sep = _special_id(tokenizer, "sep_token_id", "frame masked-LM windows")
        _special_id(tokenizer, "mask_token_id", "mask masked-LM windows")
        stream = token_stream(corpus.documents, tokenizer, sep)
        content = cut_windows(stream, seq_len - 2, stride - 2)
        frame = np.ones((content.shape[0], 1), dtype=np.int64)
        windows = np.hstack([frame * cls, content, frame * sep])
    rows = list(windows)
    return _Candidates(rows, tuple(window_sha256(r) for r in rows), None, None, int(stream.size))


def _example_candidates(corpus: Corpus, tokenizer: Any, seq_len: int) -> _Candidates:
    if corpus.labels is None:
        raise InputError(f"accuracy needs a labelled dataset; '{corpus.source.spec()}' has no "
                         f"'{corpus.source.label_field}' labels")
    want_types = corpus.pairs is not None or "token_type_ids" in getattr(
        tokenizer, "model_input_names", ())
    enc = tokenizer(list(corpus.documents), list(corpus.pairs) if corpus.pairs else None,
                    truncation=True, max_length=seq_len, return_attention_mask=False,
                    return_token_type_ids=want_types or None, verbose=False)
    ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
    types = enc.get("token_type_ids") if want_types else None
    labels = np.asarray(corpus.labels, dtype=np.int64)
    hashes = tuple(window_sha256(x, int(y)) for x, y in zip(ids, labels, strict=True))
    return _Candidates(ids, hashes, labels,
                       [np.asarray(t, dtype=np.int64) for t in types] if types else None,
                       int(sum(x.size for x in ids)))


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Batch-encode raw text: no template tokens, no truncation, no length warnings."""
    if not getattr(tokenizer, "is_fast", True):
        logger.warning("tokenizer is not a fast tokenizer; tokenizing may be slow")
    out = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    return out["input_ids"]


def _special_id(tokenizer: Any, attr: str, purpose: str, required: bool = True) -> int:
    value = getattr(tokenizer, attr, None)
    if value is None:
        if required:
            raise InputError(f"the tokenizer has no {attr.removesuffix('_id')}, which is "
                             f"needed to {purpose}")
        return -1
    return int(value)


# --- selection -------------------------------------------------------------------------------

def _check_arguments(kind: MetricKind, seq_len: int, stride: int, preview_n: int,
                     final_n: int, seed: int) -> None:
    minimum = 3 if kind is MetricKind.PPL_MLM else 2
    if seq_len < minimum:
        raise InputError(f"dataset.seq_len must be at least {minimum} for {kind}, got {seq_len}")
    if stride < seq_len:
        raise InputError(f"dataset.stride ({stride}) is shorter than dataset.seq_len "
                         f"({seq_len}): windows would overlap; use stride >= seq_len")
    if preview_n < 1 or final_n < 1:
        raise InputError(f"preview_n and final_n must be at least 1, got {preview_n}+{final_n}")
    if seed < 0:
        raise InputError(f"dataset.seed must be >= 0, got {seed}")


def _set_sizes(kind: MetricKind, available: int, seq_len: int, preview_n: int, final_n: int,
               strict: bool, profile: str | None) -> tuple[int, int]:
    if available >= preview_n + final_n:
        return preview_n, final_n
    unit = "examples" if kind is MetricKind.ACCURACY else f"windows of {seq_len} tokens"
    who = f"the {profile} profile" if profile else "the plan"
    problem = f"dataset yields {available} unique {unit}; {who} needs {preview_n}+{final_n}"
    if strict:
        raise EvidenceError(problem, hint="use more data, a shorter seq_len or fewer windows")
    each = available // 2
    n_preview, n_final = min(each, preview_n), min(each, final_n)
    if min(n_preview, n_final) < MIN_SET_SIZE:
        raise EvidenceError(f"{problem}; even shrunk, at least {MIN_SET_SIZE} windows per set "
                            f"are needed")
    logger.warning("%s; using %d+%d instead", problem, n_preview, n_final)
    return n_preview, n_final


def _build_set(name: str, idx: np.ndarray, cands: _Candidates, kind: MetricKind,
               tokenizer: Any, seed: int) -> WindowSet:
    hashes = tuple(cands.hashes[i] for i in idx)
    rows = [cands.ids[i] for i in idx]
    window_ids = idx.astype(np.int64)
    if cands.labels is not None:  # classifier examples
        ids, mask = _pad(rows, _pad_id(tokenizer))
        types = None
        if cands.token_types is not None:
            types, _ = _pad([cands.token_types[i] for i in idx], 0)
        return WindowSet(name, window_ids, ids, mask, cands.labels[idx], types, hashes)
    ids = np.stack(rows).astype(np.int64) if rows else np.zeros((0, 0), dtype=np.int64)
    labels = None
    if kind is MetricKind.PPL_MLM:
        ids, labels = mask_windows(ids, window_ids, seed=seed,
                                   mask_token_id=int(tokenizer.mask_token_id),
                                   special_ids=tokenizer.all_special_ids,
                                   vocab_size=len(tokenizer))
    return WindowSet(name, window_ids, ids, np.ones_like(ids), labels, None, hashes)


def _pad(rows: list[np.ndarray], value: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad rows to the longest; returns (padded [N, W], attention mask [N, W])."""
    width = max((r.size for r in rows), default=0)
    out = np.full((len(rows), width), value, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, r in enumerate(rows):  # one copy per example
        out[j, :r.size] = r
        mask[j, :r.size] = 1
    return out, mask


def _pad_id(tokenizer: Any) -> int:
    """Padding is masked out by attention_mask; pad, else EOS, else 0 fills it."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _set_record(s: WindowSet) -> dict[str, Any]:
    h = hashlib.sha256()
    for array in (s.input_ids, s.attention_mask, s.labels, s.token_type_ids):
        if array is not None:
            h.update(str(array.shape).encode())
            h.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
    return {"name": s.name, "window_ids": [int(i) for i in s.window_ids],
            "sha256": list(s.sha256), "arrays": h.hexdigest()}
