"""Per-window evaluation: agreement with Hugging Face's own losses, and invariances."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from invarlock import evaluate as evaluate_mod
from invarlock.enums import MetricKind
from invarlock.errors import InputError
from invarlock.evaluate import (
    Tap,
    TapContext,
    WindowScores,
    auto_batch_size,
    evaluate_windows,
)
from invarlock.evaluation import batching, sliced_head
from invarlock.models.loading import load_model
from invarlock.models.source import resolve_model_source

CAUSAL, MLM, ACCURACY = MetricKind.PPL_CAUSAL, MetricKind.PPL_MLM, MetricKind.ACCURACY


@dataclass(frozen=True)
class Windows:
    """The fields of a WindowSet that evaluation reads."""

    window_ids: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray | None = None
    token_type_ids: np.ndarray | None = None
    sha256: tuple[str, ...] = ()


def make_windows(ids, mask=None, labels=None, token_type_ids=None) -> Windows:
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
    hashes = tuple(hashlib.sha256(row.astype("<i8").tobytes()).hexdigest() for row in ids)
    return Windows(window_ids=np.arange(10, 10 + len(ids), dtype=np.int64), input_ids=ids,
                   attention_mask=mask, labels=labels, token_type_ids=token_type_ids,
                   sha256=hashes)


def causal_windows(n=12, seq_len=48, vocab=512, seed=0) -> Windows:
    rng = np.random.default_rng(seed)
    return make_windows(rng.integers(1, vocab, size=(n, seq_len)))


def mlm_windows(tokenizer, n=10, seq_len=40, seed=1) -> Windows:
    """[CLS] content [SEP] windows with ~15% of content positions masked (labels elsewhere -100)."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    content = np.array([i for i in range(len(tokenizer)) if i not in special])
    ids = rng.choice(content, size=(n, seq_len))
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    labels = np.full_like(ids, -100)
    masked = ids.copy()
    for row in range(n):
        positions = rng.choice(np.arange(1, seq_len - 1), size=6, replace=False)
        labels[row, positions] = ids[row, positions]
        masked[row, positions] = tokenizer.mask_token_id
    return make_windows(masked, labels=labels)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(resolve_model_source(str(tiny_gpt2_dir)))


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(resolve_model_source(str(tiny_llama_dir)))


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return load_model(resolve_model_source(str(tiny_bert_dir)))


@pytest.fixture(scope="module")
def classifier(tiny_classifier_dir):
    return load_model(resolve_model_source(str(tiny_classifier_dir)))


@pytest.fixture(scope="module")
def labelled(classifier, labelled_jsonl) -> Windows:
    rows = [json.loads(line) for line in labelled_jsonl.read_text().splitlines()][:24]
    encoded = classifier.tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                                   max_length=32, return_tensors="np")
    return make_windows(encoded["input_ids"], encoded["attention_mask"],
                        labels=np.array([r["label"] for r in rows], dtype=np.int64),
                        token_type_ids=np.zeros_like(encoded["input_ids"]))


def run(loaded, windows, kind, **kwargs) -> WindowScores:
    return evaluate_windows(loaded.model, windows, kind=kind, device="cpu", **kwargs)


# --- agreement with the model's own loss -------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_nll_matches_hf_loss_per_window(name, request):
    loaded = request.getfixturevalue(name)
    windows = causal_windows()
    scores = run(loaded, windows, CAUSAL, batch_size=5)
    seq_len = windows.input_ids.shape[1]
    assert scores.tokens.tolist() == [seq_len - 1] * windows.input_ids.shape[0]
    with torch.no_grad():
        for i, row in enumerate(windows.input_ids):
            ids = torch.from_numpy(row[None])
            loss = loaded.model(input_ids=ids, labels=ids).loss.item()  # mean over T-1
            assert scores.values[i] == pytest.approx(loss * (seq_len - 1), rel=1e-5)


def test_causal_padding_is_not_scored(gpt2):
    windows = causal_windows(n=4, seq_len=32)
    lengths = [32, 20, 9, 2]
    mask = np.zeros_like(windows.input_ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    padded = make_windows(np.where(mask == 1, windows.input_ids, 0), mask)
    scores = run(gpt2, padded, CAUSAL)
    assert scores.tokens.tolist() == [length - 1 for length in lengths]
    with torch.no_grad():
        for row, length in enumerate(lengths):
            ids = torch.from_numpy(windows.input_ids[row, :length][None])
            expected = gpt2.model(input_ids=ids, labels=ids).loss.item() * (length - 1)
            assert scores.values[row] == pytest.approx(expected, rel=1e-5)


def test_mlm_nll_only_on_masked_positions(bert):
    windows = mlm_windows(bert.tokenizer)
    scores = run(bert, windows, MLM)
    scored = (windows.labels != -100).sum(axis=1)
    assert scores.tokens.tolist() == scored.tolist()
    with torch.no_grad():
        for i in range(windows.input_ids.shape[0]):
            out = bert.model(input_ids=torch.from_numpy(windows.input_ids[i:i + 1]),
                             labels=torch.from_numpy(windows.labels[i:i + 1]))
            assert scores.values[i] == pytest.approx(out.loss.item() * scored[i], rel=1e-5)
    # Changing the label of an unscored position changes nothing.
    labels = windows.labels.copy()
    assert labels[0, 1:].min() == -100
    shifted = make_windows(windows.input_ids, labels=labels)
    np.testing.assert_array_equal(run(bert, shifted, MLM).values, scores.values)


def test_classifier_correctness_matches_argmax(classifier, labelled):
    scores = run(classifier, labelled, ACCURACY)
    with torch.no_grad():
        logits = classifier.model(
            input_ids=torch.from_numpy(labelled.input_ids),
            attention_mask=torch.from_numpy(labelled.attention_mask),
            token_type_ids=torch.from_numpy(labelled.token_type_ids)).logits
    expected = (logits.argmax(-1).numpy() == labelled.labels).astype(np.float64)
    np.testing.assert_array_equal(scores.values, expected)
    assert 0 < expected.sum() < len(expected)  # both outcomes occur: the check can fail
    assert scores.tokens.tolist() == [1] * len(expected)
    assert scores.kind is ACCURACY


# --- chunked scoring through the output head ---------------------------------------------


def _case(name, request):
    loaded = request.getfixturevalue(name)
    if name == "bert":
        return loaded, mlm_windows(loaded.tokenizer), MLM
    return loaded, causal_windows(), CAUSAL


def _assert_equals_full_logits(scores, loaded, windows, kind, monkeypatch):
    """``scores`` equal the same windows scored through the model's whole logits."""
    monkeypatch.setattr(evaluate_mod, "_chunkable_head", lambda *_args: None)
    full = run(loaded, windows, kind, batch_size=4)
    np.testing.assert_allclose(scores.values, full.values, rtol=1e-6)
    np.testing.assert_array_equal(scores.tokens, full.tokens)
    assert scores.nonfinite_windows == full.nonfinite_windows == 0


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_vocabulary_sliced_scoring_equals_full_logits(name, request, monkeypatch):
    """Scores from the head's weight applied 7 vocabulary entries at a time (a running
    log-sum-exp) equal scores from whole logits; the head module itself is never called."""
    loaded, windows, kind = _case(name, request)
    head = loaded.model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and (name != "bert" or head.bias is not None)
    slices_sized = []

    def seven(*args):
        slices_sized.append(args)
        return 7

    monkeypatch.setattr(sliced_head, "head_slice_columns", seven)
    calls = []  # a global hook: it leaves the head itself unhooked, hence sliceable

    def record(module, args, _out):
        if module is head:
            calls.append(args[0].shape)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        sliced = run(loaded, windows, kind, batch_size=4)
    finally:
        handle.remove()
    _assert_equals_full_logits(sliced, loaded, windows, kind, monkeypatch)
    assert slices_sized and len(calls) == 1  # the probe pass only: slices bypass the module


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_position_chunked_scoring_equals_full_logits(name, request, monkeypatch):
    """A head that cannot be sliced (here: one with a hook, which slicing would bypass) is
    called on 7 positions at a time, and its scores equal scores from whole logits."""
    loaded, windows, kind = _case(name, request)
    head = loaded.model.get_output_embeddings()
    rows_seen = []
    handle = head.register_forward_hook(lambda _m, args, _o: rows_seen.append(args[0].shape))
    monkeypatch.setattr(sliced_head, "head_chunk_rows", lambda *_args: 7)
    try:
        chunked = run(loaded, windows, kind, batch_size=4)
    finally:
        handle.remove()
    _assert_equals_full_logits(chunked, loaded, windows, kind, monkeypatch)
    # after the probe pass, the head only ever saw 2-D chunks of at most 7 positions
    assert len(rows_seen[0]) == 3
    assert rows_seen[1:] and all(len(s) == 2 and s[0] <= 7 for s in rows_seen[1:])


def test_chunk_size_bounds_logit_memory_not_batch_size():
    # a 128k vocabulary in float32: one chunk's logits and losses fit 1/8 of the CPU budget
    rows = batching.head_chunk_rows(128_256, 4, "cpu")
    # per position: float32 logits, the log-softmax inside cross-entropy, a finiteness flag
    assert rows >= 1 and rows * 128_256 * (4 + 4 + 1) <= batching.CPU_BUDGET_BYTES // 8
    big = _FakeLM(vocab=128_256, hidden=64)
    full = auto_batch_size(big, n=64, seq_len=256, device="cpu")
    chunked = auto_batch_size(big, n=64, seq_len=256, device="cpu", full_logits=False)
    assert full == 1 and chunked > 1  # the batch is no longer capped by V x T


@pytest.mark.parametrize("columns", [1, 5, 16, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_slices_give_cross_entropy(columns, dtype):
    """Slice by slice (any slice width, targets on slice edges, a bias, ignored rows, a
    model dtype narrower than float32) the losses are cross-entropy of the whole logits,
    and a row whose logits hold NaN gets a non-finite loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=gen).to(dtype)
    weight, bias = torch.randn(37, 8, generator=gen).to(dtype), torch.randn(37, generator=gen)
    bias = bias.to(dtype)
    targets = torch.tensor([0, 4, 5, 15, 16, 36, -100, 7, 31, 32, 3, -100])
    x[10, 0] = float("nan")
    losses = sliced_head._vocab_sliced_losses(x, weight, bias, targets, columns)
    expected = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(x, weight, bias).float(), targets, reduction="none",
        ignore_index=-100)
    finite = torch.isfinite(expected)
    assert finite.tolist() == [i != 10 for i in range(12)]
    torch.testing.assert_close(losses[finite], expected[finite], rtol=2e-6, atol=2e-6)
    assert not torch.isfinite(losses[10]) and losses[targets == -100].tolist() == [0.0, 0.0]


def test_slice_width_follows_the_budget_and_the_cache():
    # CPU: one slice's float32 logits near 8 MiB, never under 256 columns, never over V
    assert batching.head_slice_columns(4096, 49_152, 4, "cpu") == 512
    assert batching.head_slice_columns(16_384, 128_256, 4, "cpu") == 256
    assert batching.head_slice_columns(8, 1000, 4, "cpu") == 1000
    assert batching.head_slice_columns(6144, 128_256, 4, "cpu") == 320  # 341, aligned
    # and within 1/8 of the budget, whatever the rows (logits; a float32 copy of bfloat16)
    rows = 2_000_000
    for elem, per_logit in ((4, 4), (2, 6)):
        columns = batching.head_slice_columns(rows // 8, 128_256, elem, "cpu")
        assert columns * rows // 8 * per_logit <= batching.CPU_BUDGET_BYTES // 8
        assert batching.head_slice_columns(20 * rows, 128_256, elem, "cpu") == 1


class _ScaledHeadLM(torch.nn.Module):
    """A causal LM whose forward rescales the head's output (like logit soft-capping)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, **inputs):
        out = self.inner(**inputs)
        out.logits = out.logits * 0.5
        return out


def test_model_that_changes_head_output_is_scored_through_its_logits(llama):
    model = _ScaledHeadLM(llama.model)
    windows = causal_windows(n=3)
    scores = evaluate_windows(model, windows, kind=CAUSAL, device="cpu")
    plain = run(llama, windows, CAUSAL)
    assert not np.allclose(scores.values, plain.values)
    with torch.no_grad():
        ids = torch.from_numpy(windows.input_ids)
        logits = llama.model(input_ids=ids).logits[:, :-1] * 0.5
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                reduction="none").double().sum(dim=1)
    np.testing.assert_allclose(scores.values, nll.numpy(), rtol=1e-5)


# --- invariances -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gpt2", "llama", "bert", "classifier"])
def test_results_independent_of_batch_size(case, request):
    loaded = request.getfixturevalue(case)
    if case == "bert":
        windows, kind = mlm_windows(loaded.tokenizer), MLM
    elif case == "classifier":
        windows, kind = request.getfixturevalue("labelled"), ACCURACY
    else:
        windows, kind = causal_windows(), CAUSAL
    one = run(loaded, windows, kind, batch_size=1)
    four = run(loaded, windows, kind, batch_size=4)
    auto = run(loaded, windows, kind)
    for other in (four, auto):
        np.testing.assert_allclose(other.values, one.values, rtol=1e-5)
        np.testing.assert_array_equal(other.tokens, one.tokens)


def test_auto_batches_windows_together(gpt2):
    calls = []
    handle = gpt2.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    try:
        run(gpt2, causal_windows(n=20, seq_len=48), CAUSAL)
    finally:
        handle.remove()
    # one short probe pass (is the head the model's last step?), then one batch of all 20
    assert calls == [(1, evaluate_mod.PROBE_TOKENS), (20, 48)]


def test_scores_record_what_was_evaluated(gpt2):
    windows = causal_windows(n=6)
    scores = run(gpt2, windows, "ppl_causal")
    assert scores.kind is CAUSAL and scores.n == 6
    assert scores.values.dtype == np.float64 and scores.tokens.dtype == np.int64
    assert scores.window_ids.dtype == np.int64
    np.testing.assert_array_equal(scores.window_ids, windows.window_ids)
    assert scores.window_ids is not windows.window_ids
    assert scores.sha256 == windows.sha256
    assert scores.nonfinite_windows == 0 and np.isfinite(scores.values).all()
    assert scores.seconds > 0 and scores.tokens_per_second > 0


def test_train_mode_is_restored_and_dropout_off(gpt2):
    model = copy.deepcopy(gpt2.model)
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    windows = causal_windows(n=4)
    scores = evaluate_windows(model, windows, kind=CAUSAL, device="cpu")
    assert [m.training for m in model.modules()] == before
    np.testing.assert_array_equal(scores.values, run(gpt2, windows, CAUSAL).values)


# --- taps --------------------------------------------------------------------------------


class RecordingTap:
    """Observes every Linear/Conv1D output (and whole blocks, which return tuples)."""

    def __init__(self, tamper: bool = False) -> None:
        self.seen: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        self.tamper = tamper

    def modules(self, model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
        head = model.get_output_embeddings()  # applied outside the pass, in weight slices
        for name, module in model.named_modules():
            if type(module).__name__ in {"Linear", "Conv1D", "GPT2Block"} and module is not head:
                yield name, module

    def observe(self, name: str, output, context: TapContext):
        tensor = output[0] if isinstance(output, tuple) else output
        self.seen.append((name, tuple(tensor.shape), tuple(context.window_ids.tolist())))
        if self.tamper:
            return torch.zeros_like(tensor)  # a return value must not replace the output
        return None


@pytest.mark.parametrize("tamper", [False, True])
def test_taps_observe_without_changing_results(gpt2, tamper):
    windows = causal_windows(n=6)
    plain = run(gpt2, windows, CAUSAL, batch_size=4)
    tap = RecordingTap(tamper=tamper)
    assert isinstance(tap, Tap)
    tapped = run(gpt2, windows, CAUSAL, batch_size=4, taps=[tap])
    np.testing.assert_array_equal(tapped.values, plain.values)  # bit-identical
    modules = list(tap.modules(gpt2.model))
    assert len(tap.seen) == 2 * len(modules)  # every tapped module, in both batches
    batches = {seen[2] for seen in tap.seen}
    assert batches == {(10, 11, 12, 13), (14, 15)}
    assert all(not m._forward_hooks for _, m in modules)  # hooks removed after the call


def test_hooks_removed_when_evaluation_fails(gpt2):
    tap = RecordingTap()
    too_long = causal_windows(n=2, seq_len=200)
    with pytest.raises(InputError):
        run(gpt2, too_long, CAUSAL, taps=tap)
    broken = make_windows(causal_windows(n=2).input_ids, labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError):
        run(gpt2, broken, ACCURACY, taps=tap)
    assert all(not m._forward_hooks for m in gpt2.model.modules())
    assert all(not m._forward_pre_hooks for m in gpt2.model.modules())


# --- broken models and bad input ---------------------------------------------------------


def test_nan_weight_marks_windows_without_raising(llama):
    """A NaN in one (untied) embedding row breaks exactly the windows that use that token."""
    poison = 7
    rng = np.random.default_rng(3)
    ids = rng.integers(8, 512, size=(6, 32))
    ids[1, 5] = poison
    ids[4, 30] = poison
    windows = make_windows(ids)
    model = copy.deepcopy(llama.model)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    scores = evaluate_windows(model, windows, kind=CAUSAL, device="cpu", batch_size=4)
    assert scores.nonfinite_windows == 2
    assert np.isnan(scores.values[[1, 4]]).all()
    clean = run(llama, windows, CAUSAL)
    keep = [0, 2, 3, 5]
    np.testing.assert_allclose(scores.values[keep], clean.values[keep], rtol=1e-6)
    np.testing.assert_array_equal(scores.tokens, clean.tokens)


def test_nan_in_tied_head_breaks_every_window(gpt2):
    model = copy.deepcopy(gpt2.model)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")  # tied: also the embedding of token 3
    scores = evaluate_windows(model, causal_windows(n=5), kind=CAUSAL, device="cpu")
    assert scores.nonfinite_windows == 5 and np.isnan(scores.values).all()


def test_nan_classifier_logits(classifier, labelled):
    model = copy.deepcopy(classifier.model)
    with torch.no_grad():
        model.classifier.bias[0] = float("inf")
        model.classifier.bias[1] = float("-inf")
    scores = evaluate_windows(model, labelled, kind=ACCURACY, device="cpu")
    assert scores.nonfinite_windows == labelled.input_ids.shape[0]
    assert np.isnan(scores.values).all()


def test_huge_finite_logits_are_not_counted_as_nonfinite(classifier, labelled):
    model = copy.deepcopy(classifier.model)
    with torch.no_grad():
        model.classifier.bias.fill_(3e38)  # finite, but the row sum overflows float32
    scores = evaluate_windows(model, labelled, kind=ACCURACY, device="cpu")
    assert scores.nonfinite_windows == 0 and np.isfinite(scores.values).all()


def test_window_longer_than_model_positions(gpt2):
    with pytest.raises(InputError, match="windows of 200 tokens exceed the model's 128 positions"):
        run(gpt2, causal_windows(n=2, seq_len=200), CAUSAL)


def test_token_outside_vocabulary(gpt2):
    windows = causal_windows(n=2)
    windows.input_ids[1, 3] = 600
    with pytest.raises(InputError, match="token id 600 is outside the model's vocabulary of 512"):
        run(gpt2, windows, CAUSAL)


@pytest.mark.parametrize(("kind", "labels", "message"), [
    (CAUSAL, np.zeros((3, 16), dtype=np.int64), "causal windows carry no labels"),
    (MLM, None, r"masked-LM windows need labels of shape \[N, T\]"),
    (ACCURACY, np.zeros((3, 16), dtype=np.int64), r"one class label per window, shape \[N\]"),
])
def test_labels_must_fit_the_metric(gpt2, kind, labels, message):
    windows = make_windows(causal_windows(n=3, seq_len=16).input_ids, labels=labels)
    with pytest.raises(ValueError, match=message):
        run(gpt2, windows, kind)


def test_batch_size_must_be_positive(gpt2):
    with pytest.raises(InputError, match="batch size must be at least 1"):
        run(gpt2, causal_windows(n=2), CAUSAL, batch_size=0)


# --- batch sizing, memory and progress ---------------------------------------------------


class _FakeLM(torch.nn.Module):
    """Only what auto_batch_size reads: config, parameters, output embeddings."""

    def __init__(self, vocab: int, hidden: int, dtype=torch.float32) -> None:
        super().__init__()
        self.config = type("Config", (), {"hidden_size": hidden, "num_attention_heads": 12,
                                          "vocab_size": vocab})()
        self.head = torch.nn.Linear(1, vocab, bias=False, dtype=dtype, device="meta")

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def test_auto_batch_size_bounds_logit_memory():
    big = _FakeLM(vocab=50_257, hidden=768)
    size = auto_batch_size(big, n=1000, seq_len=1024, device="cpu")
    assert size >= 1 and size * 1024 * 50_257 * 4 <= 512 * 2**20
    assert auto_batch_size(big, n=1000, seq_len=128, device="cpu") > size
    assert auto_batch_size(big, n=3, seq_len=128, device="cpu") == 3
    huge = _FakeLM(vocab=256_000, hidden=4096)
    assert auto_batch_size(huge, n=64, seq_len=4096, device="cpu") == 1
    half = _FakeLM(vocab=50_257, hidden=768, dtype=torch.bfloat16)
    assert auto_batch_size(half, n=1000, seq_len=1024, device="cpu") <= size


def test_cpu_batches_hold_about_a_thousand_tokens():
    small = _FakeLM(vocab=1000, hidden=64)
    assert auto_batch_size(small, n=1000, seq_len=128, device="cpu",
                           full_logits=False) == batching.CPU_BATCH_TOKENS // 128
    assert auto_batch_size(small, n=1000, seq_len=4096, device="cpu", full_logits=False) == 1


def test_out_of_memory_halves_the_batch(gpt2, monkeypatch, caplog):
    real_forward = evaluate_mod._forward
    sizes = []

    def forward(model, batch, kind, head=None):
        if batch["input_ids"].shape[1] > evaluate_mod.PROBE_TOKENS:  # not the probe pass
            sizes.append(batch["input_ids"].shape[0])
            if batch["input_ids"].shape[0] > 3:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(model, batch, kind, head)

    windows = causal_windows(n=10)
    expected = run(gpt2, windows, CAUSAL, batch_size=10)
    monkeypatch.setattr(evaluate_mod, "_forward", forward)
    scores = run(gpt2, windows, CAUSAL, batch_size=10)
    assert sizes == [10, 5, 2, 2, 2, 2, 2]
    np.testing.assert_allclose(scores.values, expected.values, rtol=1e-5)
    assert "out of memory at batch size 10" in caplog.text


def test_other_runtime_errors_propagate(gpt2, monkeypatch):
    def forward(model, batch, kind, head=None):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(evaluate_mod, "_forward", forward)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run(gpt2, causal_windows(n=2), CAUSAL)


def test_progress_only_on_request_and_on_stderr(gpt2, capfd):
    windows = causal_windows(n=4)
    run(gpt2, windows, CAUSAL)
    assert capfd.readouterr() == ("", "")
    run(gpt2, windows, CAUSAL, progress=True, batch_size=2)
    out, err = capfd.readouterr()
    assert out == "" and "evaluating (ppl_causal)" in err


def test_model_must_be_on_the_requested_device(gpt2):
    with pytest.raises(ValueError, match="the model is on cpu, not on the requested device cuda"):
        evaluate_windows(gpt2.model, causal_windows(n=2), kind=CAUSAL, device="cuda")
