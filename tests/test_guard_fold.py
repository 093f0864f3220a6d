"""Spectral measures what the function depends on: norm scales folded in, channel pairs
balanced, so function-preserving rescalings leave σ unchanged and real changes do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")


def _probe_after(model_dir, edit, tied_prefix=True, text: Path | None = None):
    """Measure spectral on the baseline, apply `edit` in place, measure the subject. With
    `text`, the baseline's calibration pass runs on its windows first (input sketches: the
    block linears are then measured along the data too)."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.spectral import SpectralProbe
    from invarlock.models.source import weight_files

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if text is None:
        probe = SpectralProbe({})
        probe.baseline_loaded(model)
    else:
        from tests.guardkit import sketched_spectral_baseline

        probe, _, _ = sketched_spectral_baseline(model, model_dir, text)
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
    (rel,) = llama["model.layers.0.self_attn.o_proj.weight"]["balance"]["relations"]
    assert rel["b"]["group"] == 2 and rel["a"]["weight"].endswith("v_proj.weight")
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


def _rmt_counts(model, plan, seed=0):
    """Outlier counts per module and window group of the RMT probe's tap (balancing factors
    from `plan`) over 8 windows of 48 random tokens, and the balanced module names."""
    from invarlock.evaluate import TapContext
    from invarlock.guards import rmt
    from invarlock.guards.measure.rmt import RowTap, balancing_factors, linear_modules

    class Clock:
        seconds = 0.0

    modules = linear_modules(model, rmt.FAMILIES)
    tap = RowTap(modules, [[0, 1, 2, 3], [4, 5, 6, 7]], 24, seed, Clock(),
                 balancing_factors(model, modules, plan))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (8, 48), generator=gen)
    context = TapContext(np.arange(8), torch.ones(8, 48, dtype=torch.int64))
    handles = [m.register_forward_hook(
        lambda _m, _a, out, name=name: tap.observe(name, out, context)) for name, m in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    done = tap.complete()
    assert set(done) == {n for n, _ in modules}
    return {n: [rmt.outliers(g) for g in r["groups"]] for n, r in done.items()}, tap.balanced, \
        {n: r["groups"] for n, r in done.items()}


RESCALED = {  # architecture → the pairs its q/k, value and up rescalings must cover
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    "qwen3": ("v_proj", "o_proj", "up_proj", "down_proj"),  # q/k scale sits on q_norm/k_norm
    "gpt2": ("c_attn", "c_proj"),
    "gpt_neox": ("query_key_value", "dense"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


PAIRS = {"qk_scale": ("q_proj", "k_proj"), "awq_scale": ("v_proj", "o_proj", "up_proj",
                                                        "down_proj")}


@pytest.mark.parametrize(("arch", "families"), [
    *[(arch, ("qk_scale", "awq_scale", "normfold_all", "sign_flip"))
      for arch in sorted(RESCALED)],
    *[(arch, (family,)) for arch in ("llama", "qwen2", "gemma") for family in PAIRS]])
def test_rescalings_a_real_method_uses_move_no_sigma_and_no_outlier(
        arch, families, tiny_llama_dir, tiny_gpt2_dir, tiny_qwen2_dir, tiny_causal_dirs,
        sonnets_path):
    """SmoothAttention q/k scales (per key head and rotary pair, λ in [0.5, 2]), AWQ's
    activation-aware v→o and up→down scales and norm folds, each pair alone and all together
    (with sign flips of the pairs' classes on top):
    the logits do not move (the rescaling really preserves the function), no σ moves, in
    weight space or along the data (the balanced tier's spectral guard passes), no RMT
    outlier count moves; the producers' raw outputs did change, so the invariance is the
    balancing's."""
    import copy

    from transformers import AutoModelForCausalLM

    from invarlock.calibration.zoo import BENIGN
    from invarlock.guards import spectral
    from invarlock.guards.measure.fold import transform_plan

    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir,
                 "qwen2": tiny_qwen2_dir}.get(arch) or tiny_causal_dirs[arch]

    def rescale(model):
        for family in families:
            BENIGN[family](model, 5)

    expected = set(RESCALED[arch]) if len(families) > 1 else set(PAIRS[families[0]])

    _state, measured, before, after = _probe_after(model_dir, rescale, text=sonnets_path)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    moved = {m["name"]: m["sigma_subject"] / m["sigma_baseline"] - 1
             for m in measured["modules"] if m["changed"]}
    assert {leaf for leaf in expected if any(f".{leaf}." in n for n in moved)} == expected
    assert max(abs(r) for r in moved.values()) < 1e-4, max(moved.items(), key=lambda t: abs(t[1]))
    along = {m["name"]: m["sigma_data_subject"] / m["sigma_data_baseline"] - 1
             for m in measured["modules"] if m["changed"] and m["sigma_basis"] == "data"}
    assert set(along) == {n for n in moved if ".h." in n or ".layers." in n}
    assert max(abs(r) for r in along.values()) < 1e-4, max(along.items(), key=lambda t: abs(t[1]))
    tiers = yaml.safe_load((Path(__file__).resolve().parents[1] / "policies" /
                            "tiers.yaml").read_text())
    assert spectral.decide(measured, tiers["balanced"]["guards"]["spectral"]).passed

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    plan = transform_plan(base)
    subject = copy.deepcopy(base)
    with torch.no_grad():
        rescale(subject)
    counts_b, balanced, values_b = _rmt_counts(base, plan)
    counts_s, _, values_s = _rmt_counts(subject, plan)
    producers = [n for n in balanced if not n.endswith(("o_proj", "down_proj", "dense"))]
    assert producers
    assert counts_s == counts_b
    for name in values_b:  # the largest normalised singular values too (the tail near the
        for gb, gs in zip(values_b[name], values_s[name], strict=True):  # cut may differ)
            k = min(len(gb), len(gs), 4)
            np.testing.assert_allclose(gs[:k], gb[:k], rtol=2e-3, err_msg=name)
    # without the balancing factors the producers' outputs are not the same
    raw_b = _rmt_counts(base, {})[2]
    raw_s = _rmt_counts(subject, {})[2]
    assert any(raw_b[n] != raw_s[n] for n in producers)


def _qk(model, q_scale, k_scale):
    """Layer 0's q_proj rows × q_scale and k_proj rows × k_scale (biases too)."""
    attn = model.model.layers[0].self_attn
    for proj, f in ((attn.q_proj, q_scale), (attn.k_proj, k_scale)):
        proj.weight.mul_(f[:, None])
        if proj.bias is not None:
            proj.bias.mul_(f)


@pytest.mark.parametrize(("arch", "case", "preserving"), [
    ("llama", "pair", True),            # λ on both members of a rotary pair, per key head
    ("llama", "one_member", False),     # λ on channel 0 only: RoPE no longer commutes
    ("llama", "per_query_head", False),  # two query heads sharing a key head, different λ
    ("qwen3", "pair", False),           # q_norm divides the scale out again
])
def test_q_k_balancing_absorbs_exactly_the_scales_rope_and_gqa_allow(
        arch, case, preserving, tiny_llama_dir, tiny_causal_dirs):
    """The balanced q/k matrices are the same after a rescaling that preserves the function
    and differ after one that does not (the guard does not balance damage away)."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.fold import effective, transform_plan

    model_dir = tiny_llama_dir if arch == "llama" else tiny_causal_dirs[arch]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    subject = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = base.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    lam = torch.ones(n_kv, d)
    lam[0, 0] = 2.0
    if case == "pair":
        lam[0, d // 2] = 2.0
    q = lam.repeat_interleave(n_q // n_kv, dim=0)
    if case == "per_query_head":
        lam[0, d // 2] = 2.0
        q = lam.repeat_interleave(n_q // n_kv, dim=0)
        q[1] = 1.0  # query head 1 shares key head 0 but keeps its scale
    ids = torch.arange(1, 17)[None, :]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        _qk(subject, q.flatten(), 1 / lam.flatten())
        after = subject(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5) == preserving
    plan = transform_plan(base)
    pb, ps = dict(base.named_parameters()), dict(subject.named_parameters())
    for leaf in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{leaf}.weight"
        eb = effective(name, lambda n: pb[n].detach(), plan)
        es = effective(name, lambda n: ps[n].detach(), plan)
        assert torch.allclose(eb, es, atol=1e-5) == preserving, leaf
