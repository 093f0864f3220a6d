"""Tokenizer identity: a content hash, and the differences in words when two disagree.

Baseline and subject must turn the same text into the same ids, or the paired evaluation
compares different things. The hash is taken over what decides the ids (the backend's
serialized state: normalizer, pre-tokenizer, model vocab/merges, post-processor, added
tokens; plus the special tokens and their ids), not over file bytes, so re-saved copies of
one tokenizer agree and a retrained one does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from invarlock.errors import EvidenceError

if TYPE_CHECKING:
    from invarlock.models.source import ModelSource

logger = logging.getLogger(__name__)

# Strings that exercise the usual places tokenizers diverge: case, spaces, digits,
# punctuation, accents, non-Latin scripts, emoji, code and control whitespace.
PROBES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, trailing spaces  ",
    "SHALL I COMPARE THEE TO A SUMMER'S DAY?",
    "3.14159 2,718 1e-9 100000000 0x1F",
    "naïve café — “quoted” ‘text’ «guillemets»",
    "日本語のテキストと中文文本",
    "Привет, мир! Γειά σου κόσμε!",
    "emoji 🙂👍🏽 and symbols ±§¶•",
    "def f(x):\n    return x ** 2  # comment\n",
    "tabs\tand\r\nnewlines\n\nand   runs   of   spaces",
    "https://example.com/path?q=1&r=two#frag",
    "don't won't it's y'all",
)

# Backend fields that are runtime call state, not tokenizer content.
_RUNTIME_FIELDS = ("truncation", "padding")
_COMPONENTS = (
    ("normalizer", "normalizer"),
    ("pre_tokenizer", "pre-tokenizer"),
    ("post_processor", "post-processor (special-token template)"),
    ("decoder", "decoder"),
)


def _backend_state(tokenizer: Any) -> dict | None:
    """The Rust tokenizer's serialized state, or None for a pure-Python tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    for field in _RUNTIME_FIELDS:
        state.pop(field, None)
    return state


def _special_tokens(tokenizer: Any) -> dict[str, list[tuple[str, int | None]]]:
    """Each special-token role mapped to its tokens and their ids."""
    out: dict[str, list[tuple[str, int | None]]] = {}
    for role, value in sorted(tokenizer.special_tokens_map.items()):
        values = value if isinstance(value, (list, tuple)) else [value]
        out[role] = [(str(v), tokenizer.convert_tokens_to_ids(str(v))) for v in values]
    return out


def _canonical(tokenizer: Any) -> dict:
    content: dict[str, Any] = {
        "size": len(tokenizer),
        "special_tokens": _special_tokens(tokenizer),
    }
    state = _backend_state(tokenizer)
    if state is not None:
        content["backend"] = state
    else:
        # Python tokenizers carry behaviour in their class; hash it with the vocabulary.
        content["class"] = type(tokenizer).__name__
        content["vocab"] = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        sp_model = getattr(tokenizer, "sp_model", None)
        if sp_model is not None:
            proto = sp_model.serialized_model_proto()
            content["sentencepiece"] = hashlib.sha256(proto).hexdigest()
        ranks = getattr(tokenizer, "bpe_ranks", None)
        if ranks:
            ordered = sorted(ranks.items(), key=lambda item: item[1])
            content["merges"] = [list(pair) for pair, _ in ordered]
    return content


def tokenizer_hash(tokenizer: Any) -> str:
    """``sha256:<hex>`` over the tokenizer's canonical content (sorted-key JSON)."""
    text = json.dumps(_canonical(tokenizer), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return f"sha256:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"


def tokenizer_differences(a: Any, b: Any) -> list[str]:
    """Human-readable lines saying how tokenizer ``a`` differs from ``b`` ([] if identical)."""
    if tokenizer_hash(a) == tokenizer_hash(b):
        return []
    lines: list[str] = []
    if len(a) != len(b):
        lines.append(f"vocab size {len(a)} vs {len(b)}")
    lines += _special_differences(_special_tokens(a), _special_tokens(b))
    lines += _vocab_differences(a.get_vocab(), b.get_vocab())
    state_a, state_b = _backend_state(a), _backend_state(b)
    if (state_a is None) != (state_b is None):
        kinds = ["fast (tokenizers)" if s is not None else "python" for s in (state_a, state_b)]
        lines.append(f"tokenizer backends differ: {kinds[0]} vs {kinds[1]}")
    elif state_a is not None and state_b is not None:
        lines += _backend_differences(state_a, state_b)
    changed = sum(
        a.encode(p, add_special_tokens=False) != b.encode(p, add_special_tokens=False)
        for p in PROBES
    )
    if changed:
        lines.append(f"{changed} of {len(PROBES)} probe strings tokenize differently")
    if not lines:
        lines.append("tokenizer configuration differs (same vocabulary and probe ids)")
    return lines


def _special_differences(sa: dict, sb: dict) -> list[str]:
    lines = []
    for role in sorted(set(sa) | set(sb)):
        va, vb = sa.get(role), sb.get(role)
        if va == vb:
            continue
        if va is None or vb is None:
            shown = [_show_tokens(v) if v is not None else "none" for v in (va, vb)]
            lines.append(f"special token {role} {shown[0]} vs {shown[1]}")
        elif [t for t, _ in va] != [t for t, _ in vb]:
            lines.append(f"special token {role} {_show_tokens(va)} vs {_show_tokens(vb)}")
        else:
            ids_a, ids_b = [i for _, i in va], [i for _, i in vb]
            lines.append(f"special token {role} {_show_tokens(va)} has id {ids_a} vs {ids_b}")
    return lines


def _show_tokens(entries: list[tuple[str, int | None]]) -> str:
    tokens = [repr(t) for t, _ in entries]
    return tokens[0] if len(tokens) == 1 else "[" + ", ".join(tokens) + "]"


def _vocab_differences(va: dict[str, int], vb: dict[str, int]) -> list[str]:
    if va == vb:
        return []
    only = len(va.keys() ^ vb.keys())
    moved = sum(1 for token in va.keys() & vb.keys() if va[token] != vb[token])
    parts = []
    if only:
        parts.append(f"{only} token(s) in only one")
    if moved:
        parts.append(f"{moved} token(s) with different ids")
    return [f"vocab differs: {', '.join(parts)}"]


def _backend_differences(sa: dict, sb: dict) -> list[str]:
    lines = []
    model_a, model_b = sa.get("model") or {}, sb.get("model") or {}
    if model_a.get("type") != model_b.get("type"):
        lines.append(f"tokenizer model {model_a.get('type')} vs {model_b.get('type')}")
    merges_a, merges_b = model_a.get("merges"), model_b.get("merges")
    if merges_a != merges_b:
        count_a, count_b = len(merges_a or ()), len(merges_b or ())
        detail = f"{count_a} vs {count_b}" if count_a != count_b else "same count, other content"
        lines.append(f"merges differ ({detail})")
    settings = sorted(
        key for key in (model_a.keys() | model_b.keys()) - {"type", "vocab", "merges"}
        if model_a.get(key) != model_b.get(key)
    )
    if settings:
        lines.append(f"tokenizer model settings differ: {', '.join(settings)}")
    for field, label in _COMPONENTS:
        if sa.get(field) != sb.get(field):
            lines.append(f"{label} differs")
    if sa.get("added_tokens") != sb.get("added_tokens"):
        count_a, count_b = len(sa.get("added_tokens") or ()), len(sb.get("added_tokens") or ())
        lines.append(f"added tokens differ ({count_a} vs {count_b})")
    return lines


# --- the subject's tokenizer against the baseline's ------------------------------------


def check_subject_tokenizer(base_tok: Any, tok_hash: str,
                            subj_src: ModelSource) -> tuple[str, str]:
    """The subject's tokenizer must give the baseline's ids; returns (origin, hash).

    The hash is the subject tokenizer's own, handed to the invariants guard. A tokenizer
    converted from GGUF metadata is rebuilt by transformers with settings that do not change
    ids (e.g. an empty subword prefix), so it is compared by what decides the ids: the
    vocabulary, the special tokens and the encodings of probe strings; when those agree, the
    ids are the baseline's and so is the hash it is recorded under.
    """
    from invarlock.models import loading
    from invarlock.models.formats import TOKENIZER_BASELINE, TOKENIZER_GGUF, tokenizer_origin

    origin = tokenizer_origin(subj_src)
    if origin is None:
        logger.info("GGUF subject %s carries no tokenizer: the baseline's is used", subj_src)
        return TOKENIZER_BASELINE, tok_hash
    subj_tok = loading.load_tokenizer(subj_src)
    if subj_tok is base_tok:  # the same files as the baseline's (`load_tokenizer`)
        return origin, tok_hash
    subj_hash = tokenizer_hash(subj_tok)
    if subj_hash == tok_hash:
        return origin, subj_hash
    if origin == TOKENIZER_GGUF:
        diffs = converted_differences(base_tok, subj_tok)
        if not diffs:
            return origin, tok_hash
    else:
        diffs = tokenizer_differences(base_tok, subj_tok)
    raise EvidenceError("baseline and subject tokenizers differ: "
                        + "; ".join(diffs or ["their hashes differ"]))


def converted_differences(base: Any, subj: Any) -> list[str]:
    """Differences that change ids between a tokenizer and its GGUF-converted copy."""
    diffs = []
    if base.get_vocab() != subj.get_vocab():
        diffs.append("vocabularies differ")
    for role in ("bos_token_id", "eos_token_id"):
        b, s = getattr(base, role, None), getattr(subj, role, None)
        if b is not None and s is not None and b != s:
            diffs.append(f"{role} {b} vs {s}")
    for text in PROBES:
        if base.encode(text, add_special_tokens=False) != subj.encode(
                text, add_special_tokens=False):
            diffs.append(f"ids differ on {text[:30]!r}")
            break
    return diffs
