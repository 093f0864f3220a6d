"""Spectral measures what the function depends on: norm scales folded in, channel pairs
balanced, so function-preserving rescalings leave σ unchanged and real changes do not."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _probe_after(model_dir, edit, tied_prefix=True):
    """Measure spectral on the baseline, apply `edit` in place, measure the subject."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.spectral import SpectralProbe
    from invarlock.models.source import weight_files

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    probe = SpectralProbe({})
    probe.baseline_loaded(model)
    state = probe.baseline_state()
    ids = torch.arange(1, 17)[None, :]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        edit(model)
        after = model(input_ids=ids).logits
    ctx = SubjectContext(info=None, model=model, config={}, baseline_config={},
                         baseline_files=weight_files(model_dir), tokenizer_hashes=("", ""),
                         base_model_prefix=model.base_model_prefix)
    probe.subject_loaded(ctx, state)
    return state, probe.measure(ctx, state), before, after


def _rescale_pairs(model, seed=0):
    """Random per-channel t on v_proj rows / o_proj columns (grouped-query aware) and on
    up_proj rows / down_proj columns: the function does not change."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        t = torch.exp(torch.randn(attn.v_proj.weight.shape[0], generator=gen))
        attn.v_proj.weight.mul_(t[:, None])
        col = torch.arange(attn.o_proj.weight.shape[1])
        kv = (col // head_dim) // group * head_dim + col % head_dim
        attn.o_proj.weight.div_(t[kv][None, :])
        u = torch.exp(torch.randn(mlp.up_proj.weight.shape[0], generator=gen))
        mlp.up_proj.weight.mul_(u[:, None])
        mlp.down_proj.weight.div_(u[None, :])


@pytest.mark.parametrize("family", ["normfold_all", "normfold_one"])
def test_norm_fold_rescaling_leaves_every_sigma_unchanged(tiny_llama_dir, tiny_gpt2_dir,
                                                          family):
    from invarlock.calibration.zoo import BENIGN

    for model_dir in (tiny_llama_dir, tiny_gpt2_dir):
        _state, measured, before, after = _probe_after(
            model_dir, lambda m: BENIGN[family](m, 3))
        assert torch.allclose(before, after, atol=1e-4)  # the edit preserves the function
        changed = [m for m in measured["modules"] if m["changed"]]
        assert changed, "the edit changed stored weights"
        for m in changed:
            r = m["sigma_subject"] / m["sigma_baseline"] - 1
            assert abs(r) < 1e-4, (m["name"], r)


def test_balanced_pairs_make_v_o_and_up_down_rescaling_invisible(tiny_llama_dir):
    _state, measured, before, after = _probe_after(tiny_llama_dir, _rescale_pairs)
    assert torch.allclose(before, after, atol=1e-4)
    moved = {m["name"]: m["sigma_subject"] / m["sigma_baseline"] - 1
             for m in measured["modules"] if m["changed"]}
    assert any("v_proj" in n for n in moved) and any("down_proj" in n for n in moved)
    assert max(abs(r) for r in moved.values()) < 1e-4


def test_trace_finds_the_norm_feeding_each_linear(tiny_llama_dir, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.fold import transform_plan

    llama = transform_plan(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    for leaf in ("q_proj", "k_proj", "v_proj"):
        assert llama[f"model.layers.1.self_attn.{leaf}.weight"]["fold"]["norm"] == \
            "model.layers.1.input_layernorm.weight"
    for leaf in ("gate_proj", "up_proj"):
        assert llama[f"model.layers.0.mlp.{leaf}.weight"]["fold"]["norm"] == \
            "model.layers.0.post_attention_layernorm.weight"
    assert llama["lm_head.weight"]["fold"]["norm"] == "model.norm.weight"  # untied here
    assert "fold" not in llama.get("model.layers.0.self_attn.o_proj.weight", {})
    assert llama["model.layers.0.self_attn.o_proj.weight"]["balance"]["group"] == 2
    gpt2 = transform_plan(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir))
    assert gpt2["transformer.h.0.attn.c_attn.weight"]["fold"] == {
        "norm": "transformer.h.0.ln_1.weight", "offset": 0.0, "transposed": True}
    assert gpt2["transformer.h.1.mlp.c_fc.weight"]["fold"]["norm"] == \
        "transformer.h.1.ln_2.weight"
    assert "lm_head.weight" not in gpt2  # tied to the embedding: never folded


def test_a_norm_scale_change_alone_is_seen_through_the_fold(tiny_llama_dir):
    """γ is 1-D (no σ of its own); doubling it doubles the function's q/k/v maps."""
    def double_gamma(model):
        model.model.layers[0].input_layernorm.weight.mul_(2.0)

    _, measured, before, after = _probe_after(tiny_llama_dir, double_gamma)
    assert not torch.allclose(before, after)
    by = {m["name"]: m for m in measured["modules"]}
    q = by["model.layers.0.self_attn.q_proj.weight"]
    assert q["sigma_subject"] == pytest.approx(2 * q["sigma_baseline"], rel=1e-4)


def test_whole_family_scaled_fails_on_the_own_baseline_check():
    from invarlock.guards import spectral

    policy = {"sigma_quantile": 0.5, "deadband": 0.10, "max_caps": 5,
              "max_spectral_norm": None, "module_change_limit": 0.25,
              "multiple_testing": {"method": "bh", "alpha": 0.05, "m": 4},
              "family_caps": {"attn": 3.0, "ffn": 3.0, "embed": 3.0, "other": 3.0}}
    mods = [{"name": f"layers.{i}.attn.q_proj.weight", "family": "attn",
             "sigma_baseline": 2.0 + 0.1 * i, "sigma_subject": 1.5 * (2.0 + 0.1 * i)}
            for i in range(12)]
    mods += [{"name": f"layers.{i}.mlp.up_proj.weight", "family": "ffn",
              "sigma_baseline": 3.0, "sigma_subject": 3.0} for i in range(12)]
    d = spectral.decide({"evaluated": True, "modules": mods}, policy)
    assert not d.passed and "own baseline" in d.findings[0]["message"]
    # the robust z alone would not see it: every z is 0
    d = spectral.decide({"evaluated": True, "modules": mods},
                        {**policy, "module_change_limit": None})
    assert d.passed
