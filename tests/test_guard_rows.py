"""Rows guard: the per-row change measure, its decision, and the probe on tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from invarlock.guards import rows

POLICY = {"tau": 0.3, "max_share": 0.0}


def tensor(name: str, n: int, seen: int = 0, unseen: int = 0, vocabulary: bool = False,
           max_change: float | None = 0.0) -> dict:
    return {"name": name, "family": "embed", "kind": "rows", "rows": n, "aliases": [],
            "vocabulary": vocabulary, "unseen_rows": n // 2 if vocabulary else None,
            "changed": max_change != 0.0, "max_change": max_change,
            "beyond": {"seen": seen, "unseen": unseen}, "top": []}


def measured(*tensors: dict, tau: float = 0.3) -> dict:
    return {"evaluated": True, "tau": tau, "tensors": list(tensors), "unmatched": [],
            "vocabulary": {"vocab_size": 100, "tokens_seen": 40, "coverage": 0.4}}


def test_no_row_beyond_tau_passes_and_reports_the_coverage():
    d = rows.decide(measured(tensor("wte.weight", 100, max_change=0.12),
                             tensor("ln_f.weight", 8)), POLICY)
    assert d.passed and not d.findings
    assert d.summary["vocabulary_coverage"] == 0.4 and d.summary["max_change"] == 0.12
    assert "wte.weight" in d.reason


def test_one_unseen_row_beyond_tau_fails_and_is_counted_apart():
    d = rows.decide(measured(tensor("wte.weight", 100, unseen=1, vocabulary=True,
                                    max_change=1.0)), POLICY)
    assert not d.passed
    assert d.findings[0]["module"] == "wte.weight" and d.findings[0]["share"] == 0.01
    assert "1 of tokens the windows never contain" in d.findings[0]["message"]
    assert d.summary["unseen_rows_beyond"] == 1 and d.summary["rows_beyond"] == 1


def test_max_share_allows_that_share_of_rows_and_no_more():
    t = tensor("wte.weight", 100, seen=2, unseen=1, max_change=0.9)
    assert rows.decide(measured(t), {**POLICY, "max_share": 0.03}).passed
    assert not rows.decide(measured(t), {**POLICY, "max_share": 0.029}).passed


def test_a_change_that_is_not_finite_is_stored_as_none_and_fails():
    d = rows.decide(measured(tensor("bias", 4, seen=1, max_change=None)), POLICY)
    assert not d.passed and d.summary["max_change"] is None


def test_a_policy_tau_other_than_the_measured_one_cannot_be_decided():
    d = rows.decide(measured(tensor("wte.weight", 100), tau=0.5), POLICY)
    assert not d.passed and "τ = 0.5" in d.reason


def test_unmeasured_and_empty_sections_fail():
    assert not rows.decide({"evaluated": False, "why": "fatal"}, POLICY).passed
    assert not rows.decide(measured(), POLICY).passed


def test_relative_row_change_floors_rows_that_are_almost_empty():
    import torch

    from invarlock.guards.measure.rows import ROW_FLOOR, relative_row_change

    base = torch.tensor([[3.0, 4.0], [0.0, 0.001], [6.0, 8.0]])
    subject = base.clone()
    subject[0] = torch.tensor([4.0, 3.0])      # swapped entries: ‖Δ‖ = √2 of a norm-5 row
    subject[1] = torch.tensor([0.0, 0.002])    # doubled, but a near-empty row
    change = relative_row_change(base, subject).numpy()
    rms = float(np.sqrt((25 + 1e-6 + 100) / 3))
    assert change[0] == pytest.approx(np.sqrt(2) / 5)
    assert change[1] == pytest.approx(0.001 / (ROW_FLOOR * rms), rel=1e-4)
    assert change[2] == 0.0
    zeros = torch.zeros(3)
    assert relative_row_change(zeros, torch.tensor([0.0, 1e-3, 0.0])).tolist() == [
        0.0, float("inf"), 0.0]


def _probe(model_dir, damage, tokens_seen=None, tau: float = 0.3):
    """Measure `damage(model)` against the checkpoint in `model_dir` with the rows probe."""
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.rows import RowsProbe
    from invarlock.models.source import weight_files

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    probe = RowsProbe({"tau": tau})
    if tokens_seen is not None:
        probe.bind(type("Info", (), {"tokens_seen": np.asarray(tokens_seen)})())
    probe.baseline_loaded(model)
    state = probe.baseline_state()
    with torch.no_grad():
        damage(model)
    ctx = SubjectContext(info=None, model=model, config=model.config.to_dict(),
                         baseline_config={}, baseline_files=weight_files(model_dir),
                         tokenizer_hashes=("", ""), base_model_prefix=model.base_model_prefix)
    probe.subject_loaded(ctx, state)
    result = probe.measure(ctx, state)
    return result, {t["name"]: t for t in result["tensors"]}


def test_permuted_unseen_embedding_rows_of_a_tied_model_are_counted_as_unseen(tiny_gpt2_dir):
    seen = np.arange(0, 200)

    def permute(model):
        wte = model.transformer.wte.weight
        idx = [300, 301, 302, 303]
        wte[idx] = wte[[303, 300, 301, 302]].clone()

    result, by_name = _probe(tiny_gpt2_dir, permute, tokens_seen=seen)
    wte = by_name["transformer.wte.weight"]
    assert wte["vocabulary"] and "lm_head.weight" in wte["aliases"]  # tied: measured once
    assert wte["beyond"] == {"seen": 0, "unseen": 4}
    assert {r["row"] for r in wte["top"][:4]} == {300, 301, 302, 303}
    assert result["vocabulary"]["tokens_seen"] == 200
    assert result["vocabulary"]["coverage"] == pytest.approx(200 / wte["rows"])
    d = rows.decide(result, POLICY)
    assert not d.passed and "4 of tokens the windows never contain" in d.findings[0]["message"]


def test_untied_head_rows_and_final_norm_are_measured(tiny_llama_dir):
    def scramble_head(model):
        head = model.lm_head.weight
        head[400:410] = head[400:410].flip(1).clone()

    _, by_name = _probe(tiny_llama_dir, scramble_head)
    assert by_name["lm_head.weight"]["kind"] == "folded rows"  # the final norm feeds it
    assert by_name["lm_head.weight"]["beyond"]["seen"] == 10
    assert by_name["model.norm.weight"]["kind"] == "folded channels"

    def final_norm(model):
        model.model.norm.weight[:3] *= 2.0

    _, by_name = _probe(tiny_llama_dir, final_norm)
    assert by_name["model.norm.weight"]["beyond"]["seen"] == 3


def test_a_norm_fold_changes_nothing_but_a_norm_change_does(tiny_gpt2_dir):
    """(γ, β)/s with W·diag(s) is the same function (SmoothQuant): no channel moves."""
    import torch

    def fold(model):
        block = model.transformer.h[0]
        s = torch.linspace(0.25, 4.0, block.ln_1.weight.shape[0])
        block.ln_1.weight.div_(s)
        block.ln_1.bias.div_(s)
        block.attn.c_attn.weight.mul_(s[:, None])  # Conv1D: [in, out]

    def damage(model):
        model.transformer.h[0].ln_1.weight[:4] *= 1.5

    def damage_then_fold(model):
        damage(model)
        fold(model)

    names = ("transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias")
    _, folded = _probe(tiny_gpt2_dir, fold)
    assert folded[names[0]]["kind"] == "folded channels"
    assert all(folded[n]["max_change"] < 1e-5 for n in names)
    changes = []
    for edit in (damage, damage_then_fold):
        _, by_name = _probe(tiny_gpt2_dir, edit)
        assert by_name[names[0]]["beyond"]["seen"] == 4
        changes.append(by_name[names[0]]["max_change"])
    # the fold changes nothing of the damage; γ·1.5 reads as about 0.5, not exactly: the
    # columns are compared balanced in their q/k and value pairs, and the balancing scales
    # are taken of the folded c_attn, which the damaged γ changes a little
    assert changes[1] == pytest.approx(changes[0], rel=1e-4)
    assert changes[0] == pytest.approx(0.5, rel=0.05)


def test_norm_scales_of_a_tied_model_are_compared_as_stored(tiny_gpt2_dir):
    def final_norm(model):
        model.transformer.ln_f.weight.mul_(1.5)

    _, by_name = _probe(tiny_gpt2_dir, final_norm)
    ln_f = by_name["transformer.ln_f.weight"]
    assert ln_f["kind"] == "channels" and ln_f["max_change"] == pytest.approx(0.5)
    assert ln_f["beyond"]["seen"] == ln_f["rows"]


@pytest.mark.parametrize("family", ["qk_scale", "awq_scale"])
def test_q_k_and_value_rescalings_move_no_bias_or_norm_channel(tiny_gpt2_dir, family):
    """SmoothAttention (q·t, k/t) and AWQ (value rows / s, c_proj columns · s) scale
    c_attn's bias and its column norms; compared balanced, nothing moves."""
    from invarlock.calibration import zoo

    result, by_name = _probe(tiny_gpt2_dir, lambda model: zoo.BENIGN[family](model, 0))
    bias = by_name["transformer.h.0.attn.c_attn.bias"]
    assert bias["kind"] == "balanced channels"
    assert max(t["max_change"] for t in result["tensors"]) < 1e-5


def test_a_changed_bias_of_a_balanced_producer_is_still_seen(tiny_gpt2_dir):
    def damage(model):
        model.transformer.h[0].attn.c_attn.bias[:3] += 10.0

    _, by_name = _probe(tiny_gpt2_dir, damage)
    assert by_name["transformer.h.0.attn.c_attn.bias"]["beyond"]["seen"] == 3


@pytest.mark.parametrize("damage", ["permute", "none"])
def test_an_embedding_read_by_row_blocks_gives_the_record_a_whole_read_gives(
        tiny_gpt2_dir, monkeypatch, damage):
    """A large embedding is compared a block of rows at a time from the files (never whole
    beside the subject's): every record is the one the whole read gives, unchanged or not."""
    from invarlock.guards.measure import rows as rows_probe
    from invarlock.guards.measure import weights

    def edit(model):
        if damage == "permute":
            wte = model.transformer.wte.weight
            wte[[5, 300, 301]] = wte[[301, 5, 300]].clone()
            wte[7] *= 3.0

    seen = np.arange(0, 200)
    whole, _ = _probe(tiny_gpt2_dir, edit, tokens_seen=seen)
    blocks = []
    real = rows_probe.blockwise_row_change
    monkeypatch.setattr(rows_probe, "blockwise_row_change",
                        lambda *a: blocks.append(a[1].shape) or real(*a))
    monkeypatch.setattr(weights, "ROW_BLOCKS_MIN_ELEMENTS", 1)
    monkeypatch.setattr(weights, "ROW_BLOCK_ELEMENTS", 200)  # a few rows per block
    by_blocks, by_name = _probe(tiny_gpt2_dir, edit, tokens_seen=seen)
    assert by_name["transformer.wte.weight"]["rows"] in {int(s[0]) for s in blocks}
    assert by_blocks == whole
    assert by_name["transformer.wte.weight"]["changed"] is (damage == "permute")
