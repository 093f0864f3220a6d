"""Distribution evidence: per-token KL divergence both ways, top-token agreement and Δp,
against a full-logits reference; the compact baseline form against the exact value; the
per-window sums and summaries the certificate stores (invarlock/distribution.py, and the
scoring pass in invarlock/evaluate.py and invarlock/distribution_pass.py)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from invarlock import distribution as dist
from invarlock import distribution_pass
from invarlock import evaluate as evaluate_mod
from invarlock.errors import EvidenceError
from invarlock.evaluate import evaluate_windows
from invarlock.evaluation import sliced_head
from invarlock.models.loading import load_model
from invarlock.models.source import resolve_model_source
from tests.test_evaluate import causal_windows, make_windows

DEMO = Path(evaluate_mod.__file__).parent / "demo"


def _noisy(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """A copy with every matrix perturbed: a stand-in for an edited subject."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return out


def _rtn(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Per-row round-to-nearest of every matrix but the embeddings (a benign-ish quant)."""
    out = copy.deepcopy(model)
    top = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.ndim == 2 and "wte" not in name and "wpe" not in name:
                step = p.abs().amax(dim=1, keepdim=True) / top
                p.copy_((p / step).round().clamp(-top - 1, top) * step)
    return out


def _reference(base: torch.nn.Module, subj: torch.nn.Module, ids: np.ndarray) -> dict:
    """Per scored token from whole logits: exact KL both ways, agreement, Δp."""
    x = torch.as_tensor(ids)
    with torch.no_grad():
        p = torch.log_softmax(base(x).logits.double(), -1)[:, :-1].reshape(-1, base.config
                                                                            .vocab_size)
        q = torch.log_softmax(subj(x).logits.double(), -1)[:, :-1].reshape(-1, base.config
                                                                            .vocab_size)
    target = x[:, 1:].reshape(-1, 1)
    return {"kld": (p.exp() * (p - q)).sum(-1).numpy(),
            "kld_reverse": (q.exp() * (q - p)).sum(-1).numpy(),
            "same_top": (p.argmax(-1) == q.argmax(-1)).numpy(),
            "delta_p": (q.gather(1, target).exp() - p.gather(1, target).exp())[:, 0].numpy()}


def _pair(base, subj, windows, k, **kwargs):
    b = evaluate_windows(base, windows, kind="ppl_causal", device="cpu", distribution=k,
                         **kwargs)
    s = evaluate_windows(subj, windows, kind="ppl_causal", device="cpu",
                         distribution=b.distribution, **kwargs)
    return b, s


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(resolve_model_source(str(tiny_gpt2_dir))).model


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(resolve_model_source(str(tiny_llama_dir))).model


# --- against whole logits -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("path", ["vocabulary slices", "position chunks", "full logits"])
def test_kld_agreement_and_delta_p_equal_a_full_logits_reference(name, path, request,
                                                                 monkeypatch):
    """With k covering the vocabulary the compact form is the whole distribution: every
    scoring path gives the exact per-token KL(base‖subj), KL(subj‖base), agreement and Δp."""
    base = request.getfixturevalue(name)
    subj = _noisy(base, 0.3)
    windows = causal_windows(n=5, seq_len=24)
    if path == "vocabulary slices":
        monkeypatch.setattr(sliced_head, "head_slice_columns", lambda *_a: 7)
    elif path == "position chunks":
        base.get_output_embeddings().register_forward_hook(lambda *_a: None)  # unsliceable
        subj.get_output_embeddings().register_forward_hook(lambda *_a: None)
        monkeypatch.setattr(sliced_head, "head_chunk_rows", lambda *_a: 7)
    else:
        monkeypatch.setattr(evaluate_mod, "_chunkable_head", lambda *_a: None)
    vocab = base.config.vocab_size
    try:
        _, s = _pair(base, subj, windows, vocab, batch_size=2)
    finally:
        for m in (base, subj):
            m.get_output_embeddings()._forward_hooks.clear()
    ref = _reference(base, subj, windows.input_ids)
    c = s.distribution
    assert isinstance(c, dist.TokenComparison) and c.kld.shape == ref["kld"].shape
    assert ref["kld"].mean() > 1e-3  # the subject really differs
    np.testing.assert_allclose(c.kld, ref["kld"], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(c.kld_reverse, ref["kld_reverse"], rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(c.same_top, ref["same_top"])
    assert 0.0 < c.same_top.mean() < 1.0
    np.testing.assert_allclose(c.delta_p, ref["delta_p"], atol=1e-6)


def test_identical_models_have_zero_kld_and_full_agreement(gpt2):
    _, s = _pair(gpt2, gpt2, causal_windows(n=3, seq_len=16), dist.TOP_K)
    assert np.abs(s.distribution.kld).max() < 1e-6
    assert np.abs(s.distribution.kld_reverse).max() < 1e-6
    assert s.distribution.same_top.all() and np.abs(s.distribution.delta_p).max() < 1e-6


def test_results_do_not_depend_on_the_batch_size_or_window_subset(gpt2):
    subj = _noisy(gpt2, 0.3)
    windows = causal_windows(n=6, seq_len=16)
    b, one = _pair(gpt2, subj, windows, dist.TOP_K, batch_size=1)
    four = evaluate_windows(subj, windows, kind="ppl_causal", device="cpu", batch_size=4,
                            distribution=b.distribution)
    np.testing.assert_allclose(one.distribution.kld, four.distribution.kld, rtol=1e-5,
                               atol=1e-8)
    # the reference is looked up by window id: a later subset (a sequential look) pairs too
    tail = make_windows(windows.input_ids[3:])
    tail = type(tail)(windows.window_ids[3:], tail.input_ids, tail.attention_mask,
                      sha256=tail.sha256)
    part = evaluate_windows(subj, tail, kind="ppl_causal", device="cpu",
                            distribution=b.distribution)
    rows = int(one.distribution.tokens[:3].sum())
    np.testing.assert_allclose(part.distribution.kld, one.distribution.kld[rows:], rtol=1e-5,
                               atol=1e-8)


def test_mass_moved_off_the_baseline_top_entries_gives_finite_large_divergences(gpt2):
    """A logit spiked far above the rest (the zoo's spiked embedding rows): the subject's
    mass on the baseline's top entries is below float range. Both divergences stay finite
    (not 0/0) and the forward one large (not a −inf clamped to 0)."""
    subj = copy.deepcopy(gpt2)
    spike = torch.zeros(gpt2.config.vocab_size)
    spike[int(np.argmin(np.bincount(causal_windows(n=3, seq_len=16).input_ids.ravel(),
                                    minlength=spike.numel())))] = 1e4
    head = subj.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, _i, out: out + spike)
    try:
        _, s = _pair(gpt2, subj, causal_windows(n=3, seq_len=16), 8)
    finally:
        hook.remove()
    c = s.distribution
    assert np.isfinite(c.kld).all() and np.isfinite(c.kld_reverse).all()
    assert c.kld.min() > 10.0  # nats: q ≈ e^-10000 on every top entry
    assert not c.same_top.any()


def test_a_reference_from_other_windows_is_an_evidence_error(gpt2):
    b = evaluate_windows(gpt2, causal_windows(n=2, seq_len=16), kind="ppl_causal",
                         device="cpu", distribution=8)
    longer = causal_windows(n=2, seq_len=24)
    with pytest.raises(EvidenceError, match="fewer scored tokens"):
        evaluate_windows(gpt2, longer, kind="ppl_causal", device="cpu",
                         distribution=b.distribution)
    other = make_windows(longer.input_ids)
    other = type(other)(np.array([98, 99]), other.input_ids, other.attention_mask,
                        sha256=other.sha256)
    with pytest.raises(EvidenceError, match="does not cover"):
        evaluate_windows(gpt2, other, kind="ppl_causal", device="cpu",
                         distribution=b.distribution)


# --- the compact form against the exact value ------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    loaded = load_model(resolve_model_source(str(DEMO / "model")))
    with gzip.open(DEMO / "corpus.txt.gz", "rt") as f:
        text = f.read()[:120_000]
    ids = np.asarray(loaded.tokenizer(text)["input_ids"][:16 * 128]).reshape(16, 128)
    return loaded.model, make_windows(ids)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_compact_mean_kld_is_within_one_percent_of_the_exact_value(demo, bits):
    """The demo model's distributions are flat (top-64 mass ~0.8): the tail matters, and
    the top-k form with its tail estimate still gives mean KLD both ways within 1% (or
    1e-4 absolute) of the whole-vocabulary value; agreement and Δp are exact."""
    base, windows = demo
    subj = _rtn(base, bits)
    b, s = _pair(base, subj, windows, dist.TOP_K)
    ref = _reference(base, subj, windows.input_ids)
    c = s.distribution
    for got, exact in ((c.kld.mean(), ref["kld"].mean()),
                       (c.kld_reverse.mean(), ref["kld_reverse"].mean())):
        assert abs(got - exact) <= max(0.01 * exact, 1e-4), (bits, got, exact)
    np.testing.assert_array_equal(c.same_top, ref["same_top"])
    np.testing.assert_allclose(c.delta_p, ref["delta_p"], atol=2e-6)
    # without the tail estimate (the tail as one outcome) the demo model is off by > 10%
    compact = b.distribution
    assert np.exp(compact.tail_logp).mean() > 0.1


def test_compact_form_stays_within_2_kib_per_token_and_round_trips(demo):
    base, windows = demo
    b = evaluate_windows(base, windows, kind="ppl_causal", device="cpu",
                         distribution=dist.TOP_K)
    compact = b.distribution
    rows = int(compact.tokens.sum())
    assert rows == int(b.tokens.sum()) and compact.top_ids.shape == (rows, dist.TOP_K)
    stored = json.dumps(compact.to_json())
    assert len(stored) / rows <= 2048
    back = dist.CompactDistribution.from_json(json.loads(stored))
    for field in ("window_ids", "tokens", "top_ids", "top_logp", "tail_logp", "target_logp"):
        np.testing.assert_array_equal(getattr(back, field), getattr(compact, field))
    broken = {**compact.to_json(), "tail_logp": compact.to_json()["top_logp"]}
    with pytest.raises(ValueError, match="wrong size"):
        dist.CompactDistribution.from_json(broken)


class _WideLM(torch.nn.Module):
    """One embedding, one norm, a 128k-entry linear head: the vocabulary of Llama 3."""

    def __init__(self, vocab: int = 128_256, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = type("C", (), {"hidden_size": hidden, "vocab_size": vocab,
                                     "num_attention_heads": 1})()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.mul_(8.0)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.norm(self.embed(input_ids).cumsum(dim=1))
        return type("Out", (), {"logits": self.head(h)})()


def test_a_128k_vocabulary_is_compared_a_slice_at_a_time(monkeypatch):
    """With a 128k vocabulary the running state per position is k wide, never V wide, and
    the result still equals the whole-logits reference."""
    base = _WideLM()
    subj = _noisy(base, 0.1)
    windows = causal_windows(n=2, seq_len=32, vocab=128_000)
    widths: list[tuple[int, int]] = []
    update = distribution_pass.RowStats.update

    def watched(self, logits, lo, row_max):
        update(self, logits, lo, row_max)
        state = self.values if self.reference is None else self.at_ref
        widths.append((logits.shape[1], state.shape[1]))

    monkeypatch.setattr(distribution_pass.RowStats, "update", watched)
    _, s = _pair(base, subj, windows, dist.TOP_K)
    assert widths and max(w for w, _ in widths) < 128_256  # slices, not the vocabulary
    assert {state for _, state in widths} == {dist.TOP_K}
    ref = _reference(base, subj, windows.input_ids)
    assert abs(s.distribution.kld.mean() - ref["kld"].mean()) <= max(
        0.01 * ref["kld"].mean(), 1e-4)
    np.testing.assert_array_equal(s.distribution.same_top, ref["same_top"])


# --- per-window sums and summaries (pure numpy) -----------------------------------------------

def _comparison(seed: int = 0, windows: int = 20) -> dist.TokenComparison:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 40, size=windows)
    m = int(tokens.sum())
    kld = rng.lognormal(-5, 2, size=m)
    kld[:3] = 0.0
    return dist.TokenComparison(np.arange(windows, dtype=np.int64) + 100, tokens, kld,
                                kld * 1.1, rng.random(m) < 0.9, rng.normal(0, 0.05, m))


def test_per_window_sums_give_the_token_means():
    c = _comparison()
    s = dist.summarize(c, set_name="final", top_k=64, limits=dist.Limits(), replicates=300,
                       seed=7, alpha=0.05)
    assert s["tokens"] == c.kld.size
    assert s["kld_mean"]["estimate"] == pytest.approx(c.kld.mean(), rel=1e-12)
    assert s["kld_mean"]["low"] <= c.kld.mean() <= s["kld_mean"]["high"]
    assert s["same_top_p"]["estimate"] == pytest.approx(c.same_top.mean(), rel=1e-12)
    assert s["delta_p_rms"] == pytest.approx(np.sqrt((c.delta_p ** 2).mean()), rel=1e-12)
    assert s["kld"]["max"] == c.kld.max() and s["kld"]["p99_9"] <= c.kld.max()
    hist = s["histogram"]
    assert sum(hist["counts"]) + hist["below"] + hist["above"] == c.kld.size
    assert hist["below"] >= 3  # exact agreement (KLD 0) is counted, below the first edge
    # what verify recomputes from the stored windows alone
    again = dist.recomputable(dist.WindowDistribution.from_dict(
        json.loads(json.dumps(s["windows"]))), replicates=300, seed=7, alpha=0.05)
    assert again == {k: s[k] for k in again}


@pytest.mark.parametrize("width", [64, 511, 1000, 2048, 2100, 8192])
def test_thresholded_top_k_equals_torch_topk(width):
    """The group-maxima threshold never drops a top-k entry, whatever the width (a
    remainder of columns beyond whole groups included), and ranks them as topk does."""
    x = torch.randn(37, width, generator=torch.Generator().manual_seed(width))
    x[0] = torch.linspace(0.0, 1.0, width)     # sorted: the top-k sit in one run of columns
    x[1, ::2] = 5.0                            # ties across half the row
    values, ids = distribution_pass._top_k(x, 64)
    expected = x.topk(64, dim=1)
    assert torch.equal(values[:, 0], expected.values[:, 0])  # the top token first
    torch.testing.assert_close(values.sort(dim=1, descending=True).values, expected.values,
                               rtol=0, atol=0)
    torch.testing.assert_close(x.gather(1, ids), values, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == 64 for row in ids)


def test_top_k_above_a_floor_is_exact_for_the_entries_that_reach_it():
    """A running top-k passes its smallest value as a floor: entries above it are found
    exactly, the rest may be fillers (-inf), and a floor that admits too many re-thresholds."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4096, generator=gen)
    exact = x.topk(64, dim=1)
    for floor in (exact.values[:, 10], torch.full((50,), -10.0)):
        values, ids = distribution_pass._top_k(x, 64, floor)
        values_sorted = values.sort(dim=1, descending=True).values
        reach = exact.values >= floor[:, None]
        torch.testing.assert_close(values_sorted[reach], exact.values[reach], rtol=0, atol=0)
        assert torch.equal(values_sorted[~reach], torch.full_like(values_sorted[~reach],
                                                                  float("-inf")))
        kept = values > float("-inf")
        torch.testing.assert_close(x.gather(1, ids)[kept], values[kept], rtol=0, atol=0)


def test_masked_lm_is_compared_at_its_masked_positions(tiny_bert_dir):
    from tests.test_evaluate import mlm_windows

    loaded = load_model(resolve_model_source(str(tiny_bert_dir)))
    base, subj = loaded.model, _noisy(loaded.model, 0.3)
    windows = mlm_windows(loaded.tokenizer, n=4)
    vocab = base.config.vocab_size
    b = evaluate_windows(base, windows, kind="ppl_mlm", device="cpu", distribution=vocab)
    s = evaluate_windows(subj, windows, kind="ppl_mlm", device="cpu",
                         distribution=b.distribution)
    chosen = torch.as_tensor(windows.labels != -100)
    with torch.no_grad():
        inputs = {"input_ids": torch.as_tensor(windows.input_ids),
                  "attention_mask": torch.as_tensor(windows.attention_mask)}
        p = torch.log_softmax(base(**inputs).logits.double(), -1)[chosen]
        q = torch.log_softmax(subj(**inputs).logits.double(), -1)[chosen]
    assert s.distribution.kld.shape == (int(chosen.sum()),)
    np.testing.assert_allclose(s.distribution.kld, (p.exp() * (p - q)).sum(-1).numpy(),
                               rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(s.distribution.same_top,
                                  (p.argmax(-1) == q.argmax(-1)).numpy())


# --- the baseline cache's distribution fields ------------------------------------------------

def test_cache_payload_round_trips_the_compact_form_and_rejects_a_mismatch():
    from invarlock import cache
    from invarlock.evaluate import WindowScores

    rng = np.random.default_rng(0)

    def scores(ids):
        tokens = np.array([3, 2], dtype=np.int64)
        compact = dist.CompactDistribution(
            np.asarray(ids), tokens, rng.integers(0, 100, (5, 4)).astype(np.int32),
            rng.normal(-3, 1, (5, 4)).astype(np.float32), np.full(5, -2, np.float32),
            np.full(5, -1, np.float32))
        return WindowScores("ppl_causal", np.asarray(ids), ("a" * 64,) * 2, tokens,
                            np.array([1.0, 2.0]), 0, 0.0, ("b" * 64,) * 2, compact)

    sets = {"preview": scores([1, 2]), "final": scores([3, 4])}
    payload = json.loads(json.dumps({**cache.scores_to_payload(sets, 10), "guards": {}}))
    assert cache.payload_problem(payload) is None
    back, _ = cache.scores_from_payload(payload)
    np.testing.assert_array_equal(back["final"].distribution.top_logp,
                                  sets["final"].distribution.top_logp)
    payload["distribution"]["final"]["tokens"] = [2, 3]
    assert "token counts differ" in cache.payload_problem(payload)
    payload["distribution"]["final"] = {"k": 4}
    assert cache.payload_problem(payload).startswith("distribution.final")
    # an entry of a classifier (or an older one) holds none: the sets carry None
    del payload["distribution"]
    back, _ = cache.scores_from_payload(payload)
    assert back["preview"].distribution is None
