"""The edit zoo and the guards' module view on causal LMs beyond GPT-2 and LLaMA: fused
q/k/v and gate/up projections, (1 + γ) norms, a norm feeding attention and FFN in parallel,
biased LayerNorms, post-norm blocks."""

from __future__ import annotations

import copy

import pytest

from tests import guardkit as kit
from tests.tinymodels import OTHER_CAUSAL

torch = pytest.importorskip("torch")

# Gemma 2 normalises every sublayer's output before the residual: halving an output
# projection changes nothing, so that harmful family does not apply.
NOT_APPLICABLE = {("gemma2", "outproj_half")}
# Falcon's fused query_key_value has several layouts and a GELU MLP: no q/k, value or
# up/down rescaling is known to preserve its function.
NOT_APPLICABLE |= {("falcon", f) for f in ("qk_scale", "awq_scale", "awq_rtn4", "vo_scale",
                                            "updown_scale", "sign_flip")}
# Only gated MLPs (gate/up → down) have an up → down pair to rescale.
NOT_APPLICABLE |= {(a, "updown_scale") for a in ("gpt_neox", "opt", "nemotron")}


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("arch", sorted(OTHER_CAUSAL))
def test_zoo_edits_are_seeded_and_do_what_they_say_on_other_layouts(tiny_causal_dirs, arch):
    """Every family edits something, the same seed gives the same weights, norm folds keep
    the outputs (Gemma's (1 + γ) norm included), harmful edits change them."""
    base = _load(tiny_causal_dirs[arch])
    kit.check_zoo_edits(lambda: copy.deepcopy(base), fold_atol=1e-5, harm_atol=1e-4,
                        not_applicable=frozenset(f for a, f in NOT_APPLICABLE if a == arch))


@pytest.mark.parametrize("arch", sorted(OTHER_CAUSAL))
def test_zoo_roles_agree_with_the_module_families(tiny_causal_dirs, arch):
    """The zoo's own name tables put fused projections where the guards' families do:
    attention or FFN, block output projection or not."""
    from invarlock.calibration.zoo import block_matrices
    from invarlock.families import family_of, is_block_output_projection

    blocks = block_matrices(_load(tiny_causal_dirs[arch]))
    assert blocks
    for b in blocks:
        assert b.family == family_of(b.name).value, b.name
        assert b.is_output == is_block_output_projection(b.name), b.name
        assert b.is_output != b.is_input, b.name


def test_norm_folds_refuse_a_post_norm_model(tmp_path, bpe_tokenizer_dir):
    """A post-norm block sends the norm's output into the residual: no rescaling of it
    preserves the function, so the norm-fold families say so instead of editing."""
    from invarlock.calibration import zoo
    from tests.tinymodels import build_causal

    model = _load(build_causal("opt", tmp_path / "opt-post", bpe_tokenizer_dir,
                               do_layer_norm_before=False))
    with torch.no_grad(), pytest.raises(zoo.NotApplicable, match="no pre-norm"):
        zoo.BENIGN["normfold_one"](model, 0)


@pytest.mark.parametrize("arch", sorted(OTHER_CAUSAL))
@pytest.mark.parametrize("family", ["normfold_all", "qk_scale", "awq_scale"])
def test_rescaling_families_leave_sigma_unchanged_on_other_layouts(tiny_causal_dirs, arch,
                                                                   family):
    """The spectral guard traces which norm feeds which linear (fused, parallel, offset
    norms alike) and balances q/k and value/up channel pairs: a zoo norm fold, q/k scale
    or AWQ scale keeps the logits and moves no module's σ."""
    from invarlock.calibration.zoo import BENIGN
    from tests.test_guard_fold import _probe_after

    if (arch, family) in NOT_APPLICABLE:
        pytest.skip(f"{family} does not apply to {arch}")
    _state, measured, before, after = _probe_after(
        tiny_causal_dirs[arch], lambda m: BENIGN[family](m, 3))
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)
    changed = [m for m in measured["modules"] if m["changed"]]
    # under per-head q/k norms (Qwen3) the q/k scale sits on the norms' 1-D scales
    assert bool(changed) != (family == "qk_scale" and arch == "qwen3")
    for m in changed:
        assert abs(m["sigma_subject"] / m["sigma_baseline"] - 1) < 1e-4, m["name"]


def _rescale_opt_values(model, seed=0):
    """t on OPT's v_proj rows (and bias), 1/t on out_proj columns: the same function."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.decoder.layers:
        attn = layer.self_attn
        t = torch.exp(torch.randn(attn.v_proj.weight.shape[0], generator=gen))
        attn.v_proj.weight.mul_(t[:, None])
        attn.v_proj.bias.mul_(t)
        attn.out_proj.weight.div_(t[None, :])


def _rescale_phi3_up(model, seed=0):
    """u on the up half of Phi-3's fused gate_up_proj, 1/u on down_proj columns."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        mlp = layer.mlp
        half = mlp.down_proj.weight.shape[1]
        u = torch.exp(torch.randn(half, generator=gen))
        mlp.gate_up_proj.weight[half:].mul_(u[:, None])
        mlp.down_proj.weight.div_(u[None, :])


@pytest.mark.parametrize(("arch", "rescale", "moved"), [
    ("opt", _rescale_opt_values, ("v_proj", "out_proj")),
    ("phi3", _rescale_phi3_up, ("gate_up_proj", "down_proj")),
])
def test_balanced_pairs_cover_opt_values_and_phi3_fused_up(tiny_causal_dirs, arch, rescale,
                                                           moved):
    """AWQ-style producer/consumer rescalings of these layouts leave every σ unchanged,
    while the same rescaling of the producer alone is seen."""
    from tests.test_guard_fold import _probe_after

    _state, measured, before, after = _probe_after(tiny_causal_dirs[arch], rescale)
    assert torch.allclose(before, after, atol=1e-4)
    ratios = {m["name"]: m["sigma_subject"] / m["sigma_baseline"] - 1
              for m in measured["modules"] if m["changed"]}
    assert {leaf for leaf in moved if any(f".{leaf}." in n for n in ratios)} == set(moved)
    assert max(abs(r) for r in ratios.values()) < 1e-4

    def producer_only(model):
        rescale(model)
        for name, module in model.named_modules():
            if name.endswith(moved[1]):
                module.weight.copy_(dict(_load(tiny_causal_dirs[arch]).named_modules())[
                    name].weight)

    _state, measured, before, after = _probe_after(tiny_causal_dirs[arch], producer_only)
    assert not torch.allclose(before, after, atol=1e-3)
    assert max(abs(m["sigma_subject"] / m["sigma_baseline"] - 1)
               for m in measured["modules"] if m["changed"]) > 0.05


@pytest.mark.parametrize(("arch", "leaves"), [("qwen3", ("q_proj", "k_proj")),
                                              ("gemma2", ("o_proj", "down_proj"))])
def test_scale3_never_picks_a_matrix_whose_output_is_normalised(tiny_causal_dirs, arch,
                                                                 leaves):
    """q/k under q/k norms (Qwen3) and output projections under post-sublayer norms
    (Gemma 2) lose a whole-matrix scale in the next norm: ×3 there is no harmful edit."""
    from invarlock.calibration import zoo

    model = _load(tiny_causal_dirs[arch])
    normalised = zoo._normalised_after(model)
    assert {n.rsplit(".", 1)[-1] for n in normalised} == set(leaves)
    ids = torch.arange(1, 13)[None, :]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    for seed in range(8):
        edited = _load(tiny_causal_dirs[arch])
        with torch.no_grad():
            result = zoo.scale3(edited, seed)
            out = edited(input_ids=ids).logits
        assert result.modules_changed[0] not in normalised
        assert not torch.allclose(out, reference, atol=1e-4), seed


def test_spectral_reads_weights_that_transformers_renames_on_load(tiny_causal_dirs):
    """GPT-NeoX checkpoints store the head as `embed_out`, loaded as `lm_head`: the baseline
    weight is still found, so a change to the head is measured, not left unmatched."""
    from safetensors import safe_open

    from tests.test_guard_fold import _probe_after

    model_dir = tiny_causal_dirs["gpt_neox"]
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in set(f.keys())

    def triple_head(model):
        model.lm_head.weight.mul_(3.0)

    _state, measured, _before, _after = _probe_after(model_dir, triple_head)
    assert measured["unmatched"] == []
    head = {m["name"]: m for m in measured["modules"]}["lm_head.weight"]
    assert head["sigma_subject"] == pytest.approx(3 * head["sigma_baseline"], rel=1e-3)
