"""Window plans: stream, cut, dedup, seeded disjoint selection, hashes, shortage, classifiers."""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pytest

from invarlock.data.corpus import DatasetSource, build_corpus, load_corpus, parse_dataset_spec
from invarlock.data.masking import IGNORE_INDEX
from invarlock.data.windows import (
    WindowPlan,
    cut_windows,
    first_unique,
    plan_windows,
    token_stream,
    window_sha256,
)
from invarlock.enums import MetricKind
from invarlock.errors import EvidenceError, InputError

SRC = DatasetSource("text", path="mem")


@pytest.fixture(scope="module")
def sonnets(sonnets_path):
    return load_corpus(parse_dataset_spec(str(sonnets_path)), labelled=False)


@pytest.fixture(scope="module")
def sonnet_lines(sonnets_path):
    return [ln.strip() for ln in sonnets_path.read_text().splitlines() if len(ln.strip()) > 30]


def _plan(corpus, tok, kind="ppl_causal", seq_len=64, stride=None, preview_n=20, final_n=20,
          seed=3, strict=True, **kw) -> WindowPlan:
    return plan_windows(corpus, tok, kind=kind, seq_len=seq_len, stride=stride or seq_len,
                        preview_n=preview_n, final_n=final_n, seed=seed, strict=strict,
                        tokenizer_hash="sha256:tok", **kw)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _all(plan: WindowPlan):
    """(window_ids, unmasked input ids) of both sets together."""
    ids = np.concatenate([plan.preview.input_ids, plan.final.input_ids])
    for s, offset in ((plan.preview, 0), (plan.final, plan.preview.n)):
        if s.labels is not None and s.labels.ndim == 2:
            chosen = s.labels != IGNORE_INDEX
            ids[offset:offset + s.n][chosen] = s.labels[chosen]
    return np.concatenate([plan.preview.window_ids, plan.final.window_ids]), ids


# --- stream and cutting ----------------------------------------------------------------------

def test_stream_joins_documents_with_eos(bpe):
    docs = ["Shall I compare thee", "to a summer's day?", "Thou art more lovely"]
    stream = token_stream(docs, bpe, bpe.eos_token_id)
    expected = [*_ids(bpe, docs[0]), bpe.eos_token_id, *_ids(bpe, docs[1]), bpe.eos_token_id,
                *_ids(bpe, docs[2])]
    assert stream.dtype == np.int64 and stream.tolist() == expected


def test_causal_windows_are_consecutive_stream_slices_without_template_tokens(bpe, sonnet_lines):
    corpus = build_corpus(SRC, sonnet_lines[:200])
    stream = token_stream(corpus.documents, bpe, bpe.eos_token_id)
    plan = _plan(corpus, bpe, seq_len=32, stride=40, strict=False, preview_n=500, final_n=500)
    wids, ids = _all(plan)
    assert ids.shape[1] == 32
    for wid, row in zip(wids, ids, strict=True):
        assert row.tolist() == stream[wid * 40: wid * 40 + 32].tolist()
    assert plan.total_tokens == stream.size
    assert plan.available == (stream.size - 32) // 40 + 1  # no partial tail, no duplicates


def test_cut_windows_drops_the_partial_tail():
    stream = np.arange(11)
    assert cut_windows(stream, 3, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert cut_windows(stream, 3, 4).tolist() == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
    assert cut_windows(stream[:10], 3, 4).tolist() == [[0, 1, 2], [4, 5, 6]]
    assert cut_windows(stream, 12, 12).shape == (0, 12)


def test_first_unique_keeps_the_first_occurrence_in_order():
    assert first_unique(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 3]


def test_repeated_documents_give_duplicate_windows_that_are_dropped(bpe, sonnet_lines):
    """Three copies of a document exactly one window long: windows 1 and 2 repeat window 0."""
    repeated = sonnet_lines[0]
    period = len(_ids(bpe, repeated)) + 1  # document + EOS
    corpus = build_corpus(SRC, [repeated] * 3 + sonnet_lines[1:120])
    plan = _plan(corpus, bpe, seq_len=period, preview_n=10, final_n=10)
    assert plan.duplicates_dropped == 2
    full = _plan(corpus, bpe, seq_len=period, preview_n=plan.available // 2,
                 final_n=plan.available - plan.available // 2)
    wids, ids = _all(full)
    assert 0 in wids and 1 not in wids and 2 not in wids
    assert len({r.tobytes() for r in ids}) == len(ids)


# --- selection, hashing, reproducibility -----------------------------------------------------

def test_preview_and_final_are_disjoint_and_equal_length(bpe, sonnets):
    plan = _plan(sonnets, bpe, preview_n=30, final_n=40)
    assert (plan.preview.n, plan.final.n) == (30, 40) and not plan.shrunk
    assert not set(plan.preview.window_ids) & set(plan.final.window_ids)
    assert plan.overlap() == 0.0
    for s in (plan.preview, plan.final):
        assert s.input_ids.shape == (s.n, 64) and s.input_ids.dtype == np.int64
        assert (s.attention_mask == 1).all() and s.labels is None
        assert s.tokens_scored().tolist() == [63] * s.n


def test_overlap_counts_final_windows_seen_in_preview(bpe, sonnets):
    """overlap() is computed from hashes, so a plan that reused windows would show it."""
    plan = _plan(sonnets, bpe)
    leaky = WindowPlan(**{**plan.__dict__, "final": plan.preview})
    assert leaky.overlap() == 1.0


def test_same_seed_reproduces_the_plan_and_another_seed_changes_it(bpe, sonnets):
    a, b = _plan(sonnets, bpe, seed=11), _plan(sonnets, bpe, seed=11)
    assert a.digest == b.digest and a.digest.startswith("sha256:")
    assert np.array_equal(a.final.input_ids, b.final.input_ids)
    c = _plan(sonnets, bpe, seed=12)
    assert c.digest != a.digest
    assert not np.array_equal(c.preview.window_ids, a.preview.window_ids)


def test_digest_covers_tokenizer_dataset_and_layout(bpe, sonnets, sonnet_lines):
    base = _plan(sonnets, bpe).digest
    assert plan_windows(sonnets, bpe, kind="ppl_causal", seq_len=64, stride=64, preview_n=20,
                        final_n=20, seed=3, strict=True, tokenizer_hash="sha256:other"
                        ).digest != base
    assert _plan(sonnets, bpe, stride=65).digest != base
    other = build_corpus(SRC, [*sonnets.documents, "one more line"])
    assert _plan(other, bpe).digest != base


def test_window_hash_is_sha256_of_little_endian_int64_ids(bpe, sonnets):
    plan = _plan(sonnets, bpe)
    row = plan.final.input_ids[0]
    expected = hashlib.sha256(np.asarray(row, dtype="<i8").tobytes()).hexdigest()
    assert plan.final.sha256[0] == expected == window_sha256(row)
    label_hash = hashlib.sha256(np.asarray([*row, 1], dtype="<i8").tobytes()).hexdigest()
    assert window_sha256(row, 1) == label_hash


def test_wider_stride_leaves_gaps_and_shorter_stride_is_rejected(bpe, sonnets):
    wide = _plan(sonnets, bpe, seq_len=64, stride=128)
    assert wide.available == (wide.total_tokens - 64) // 128 + 1
    with pytest.raises(InputError, match=r"dataset.stride \(32\) is shorter than"):
        _plan(sonnets, bpe, seq_len=64, stride=32)


# --- shortage --------------------------------------------------------------------------------

def test_strict_shortage_is_an_evidence_error_naming_available_and_needed(bpe, sonnets):
    available = _plan(sonnets, bpe, seq_len=128).available
    with pytest.raises(EvidenceError, match=rf"dataset yields {available} unique windows of 128 "
                                            rf"tokens; the ci profile needs 200\+200"):
        _plan(sonnets, bpe, seq_len=128, preview_n=200, final_n=200, profile="ci")


def test_non_strict_shortage_warns_and_shrinks_both_sets_equally(bpe, sonnets, caplog):
    available = _plan(sonnets, bpe, seq_len=128).available
    with caplog.at_level(logging.WARNING, logger="invarlock.data.windows"):
        plan = _plan(sonnets, bpe, seq_len=128, preview_n=200, final_n=200, strict=False)
    assert (plan.preview.n, plan.final.n) == (available // 2, available // 2)
    assert plan.shrunk and plan.requested == (200, 200) and plan.overlap() == 0.0
    assert f"dataset yields {available} unique windows" in caplog.text


def test_non_strict_shortage_below_two_windows_per_set_is_an_evidence_error(bpe, sonnet_lines):
    tiny = build_corpus(SRC, sonnet_lines[:4])
    with pytest.raises(EvidenceError, match="at least 2 windows per set"):
        _plan(tiny, bpe, seq_len=32, strict=False)


# --- masked LM -------------------------------------------------------------------------------

def test_mlm_windows_are_framed_and_documents_joined_by_sep(wordpiece, sonnet_lines):
    corpus = build_corpus(SRC, sonnet_lines[:150])
    plan = _plan(corpus, wordpiece, kind="ppl_mlm", seq_len=32, strict=False,
                 preview_n=1000, final_n=1000)
    stream = token_stream(corpus.documents, wordpiece, wordpiece.sep_token_id)
    wids, ids = _all(plan)
    assert (ids[:, 0] == wordpiece.cls_token_id).all()
    assert (ids[:, -1] == wordpiece.sep_token_id).all()
    for wid, row in zip(wids, ids, strict=True):
        assert row[1:-1].tolist() == stream[wid * 30: wid * 30 + 30].tolist()
    assert (stream == wordpiece.sep_token_id).sum() == len(corpus.documents) - 1


def test_mlm_masks_are_deterministic_and_skip_special_tokens(wordpiece, sonnets):
    a = _plan(sonnets, wordpiece, kind="ppl_mlm")
    b = _plan(sonnets, wordpiece, kind="ppl_mlm")
    assert np.array_equal(a.final.input_ids, b.final.input_ids)
    assert np.array_equal(a.final.labels, b.final.labels)
    _, unmasked = _all(a)
    labels = np.concatenate([a.preview.labels, a.final.labels])
    special = np.isin(unmasked, wordpiece.all_special_ids)
    assert (labels[special] == IGNORE_INDEX).all()
    scored = np.concatenate([a.preview.tokens_scored(), a.final.tokens_scored()])
    assert (scored == (labels != IGNORE_INDEX).sum(axis=1)).all() and (scored >= 1).all()
    assert abs(scored.sum() / (~special).sum() - 0.15) < 0.01
    # hashes are of the unmasked ids
    assert a.final.sha256[0] == window_sha256(unmasked[a.preview.n])


def test_mlm_digest_covers_the_masks(wordpiece, sonnets):
    plan = _plan(sonnets, wordpiece, kind="ppl_mlm")
    labels = plan.final.labels.copy()
    labels[0, labels[0] == IGNORE_INDEX] = 5  # same windows, different scored positions
    final = type(plan.final)(**{**plan.final.__dict__, "labels": labels})
    assert WindowPlan(**{**plan.__dict__, "final": final}).digest != plan.digest


def test_missing_special_tokens_are_input_errors(bpe, wordpiece, sonnet_lines):
    corpus = build_corpus(SRC, sonnet_lines[:50])
    with pytest.raises(InputError, match="tokenizer has no eos_token, which is needed to join"):
        _plan(corpus, wordpiece, kind="ppl_causal")
    with pytest.raises(InputError, match="tokenizer has no cls_token"):
        _plan(corpus, bpe, kind="ppl_mlm")


# --- classifiers -----------------------------------------------------------------------------

def test_classifier_windows_are_examples_with_labels_and_padding(wordpiece, labelled_jsonl):
    corpus = load_corpus(parse_dataset_spec(str(labelled_jsonl)), labelled=True)
    plan = _plan(corpus, wordpiece, kind=MetricKind.ACCURACY, seq_len=24, preview_n=40,
                 final_n=40)
    assert plan.available == 120 and plan.overlap() == 0.0
    for s in (plan.preview, plan.final):
        lengths = s.attention_mask.sum(axis=1)
        assert s.input_ids.shape == (40, lengths.max()) and lengths.max() <= 24
        assert s.labels.tolist() == [corpus.labels[i] for i in s.window_ids]
        assert s.tokens_scored().tolist() == [1] * 40
        for row, n, wid in zip(s.input_ids, lengths, s.window_ids, strict=True):
            assert (row[n:] == wordpiece.pad_token_id).all()
            assert row[0] == wordpiece.cls_token_id and row[n - 1] == wordpiece.sep_token_id
            expected = wordpiece(corpus.documents[wid], truncation=True,
                                 max_length=24)["input_ids"]
            assert row[:n].tolist() == expected
        assert s.sha256[0] == window_sha256(s.input_ids[0, :lengths[0]], int(s.labels[0]))


def test_classifier_dedup_is_by_ids_and_label(wordpiece):
    docs = ["a fair youth", "a fair youth", "a fair youth", "the dark lady", "rival poet",
            "time devours", "summer's day", "marriage sonnets"]
    labels = [0, 0, 1, 1, 0, 1, 0, 1]
    corpus = build_corpus(DatasetSource("jsonl", path="mem"), docs, labels=labels)
    plan = _plan(corpus, wordpiece, kind="accuracy", seq_len=16, preview_n=3, final_n=4)
    assert plan.duplicates_dropped == 1 and plan.available == 7
    assert 1 not in set(plan.preview.window_ids) | set(plan.final.window_ids)


def test_classifier_text_pairs_get_token_type_ids(wordpiece):
    corpus = build_corpus(DatasetSource("jsonl", path="mem"),
                          ["my mistress' eyes", "are nothing like", "the sun", "coral is"],
                          pairs=["far more red", "than her lips", "red", "white snow"],
                          labels=[0, 1, 0, 1])
    plan = _plan(corpus, wordpiece, kind="accuracy", seq_len=16, preview_n=2, final_n=2)
    for s in (plan.preview, plan.final):
        assert s.token_type_ids is not None and s.token_type_ids.shape == s.input_ids.shape
        assert (s.token_type_ids.max(axis=1) == 1).all()
        assert (s.token_type_ids[s.attention_mask == 0] == 0).all()


def test_accuracy_needs_a_labelled_corpus(wordpiece, sonnets):
    with pytest.raises(InputError, match="accuracy needs a labelled dataset"):
        _plan(sonnets, wordpiece, kind="accuracy")


# --- speed -----------------------------------------------------------------------------------

def test_a_megabyte_of_text_is_planned_quickly(bpe, sonnets_path):
    """Guards against per-token Python loops: ~1 MB is one batched encode plus numpy."""
    text = sonnets_path.read_text()
    docs = [f"{i}\n{text}" for i in range(11)]
    start = time.perf_counter()
    plan = _plan(build_corpus(SRC, docs), bpe, seq_len=256, preview_n=200, final_n=200)
    assert plan.total_tokens > 400_000
    assert time.perf_counter() - start < 15.0


def test_tokens_seen_are_the_distinct_ids_of_both_sets_and_give_the_coverage(bpe, sonnets):
    plan = _plan(sonnets, bpe, preview_n=4, final_n=4)
    seen = plan.tokens_seen()
    expected = np.unique(np.concatenate([plan.preview.input_ids.ravel(),
                                         plan.final.input_ids.ravel()]))
    assert np.array_equal(seen, expected)
    coverage = plan.vocabulary_coverage(len(bpe))
    assert coverage == {"vocab_size": len(bpe), "tokens_seen": expected.size,
                        "share": expected.size / len(bpe)}
    assert 0 < coverage["share"] < 1  # eight short windows never cover a vocabulary


def test_masked_positions_count_by_their_original_token(wordpiece, sonnets):
    plan = _plan(sonnets, wordpiece, kind="ppl_mlm", preview_n=3, final_n=3)
    seen = set(plan.tokens_seen().tolist())
    for s in (plan.preview, plan.final):
        originals = s.labels[s.labels != IGNORE_INDEX]
        assert set(originals.tolist()) <= seen
        assert set(s.input_ids.ravel().tolist()) <= seen
