"""Tests for the built-in `quant_rtn` edit: RTN math on plain tensors, then module selection and
in-place editing on tiny GPT-2 / LLaMA / BERT checkpoints, then plan validation."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.pytorch_utils import Conv1D

from invarlock.edits import EDITS, EditResult, QuantRTNPlan, get_edit
from invarlock.edits.quant_rtn import apply_quant_rtn, edit_plan_from_config, quantizable_modules
from invarlock.edits.rtn_math import fake_quantize_, qmax, quantize_rows, reference_magnitude
from invarlock.enums import Family
from invarlock.errors import InputError
from invarlock.families import family_of

BITWIDTHS = range(2, 9)


def _weights(rows: int = 24, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few outliers and very different row scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, rows).unsqueeze(1)
    w[0, 5] = 8.0
    w[3, -1] = -5.0
    return w


def _quantized(w: torch.Tensor, bitwidth: int, **kwargs) -> torch.Tensor:
    out = w.clone()
    fake_quantize_(out, bitwidth, **kwargs)
    return out


# --- RTN math -----------------------------------------------------------------------------


@pytest.mark.parametrize("bitwidth", BITWIDTHS)
def test_error_bound_and_integer_levels_per_bitwidth(bitwidth):
    """Per-channel RTN: |w - ŵ| <= s/2 with s = absmax/qmax, and ŵ/s is an integer in ±qmax."""
    w = _weights()
    wq = _quantized(w, bitwidth)
    q_max = qmax(bitwidth)
    scale = (w.abs().amax(dim=1, keepdim=True) / q_max).expand_as(w)
    assert (w - wq).abs().le(scale / 2 * (1 + 1e-5) + 1e-12).all()
    levels = wq / scale
    assert (levels - levels.round()).abs().max() < 1e-4
    assert levels.round().abs().max() <= q_max
    # The channel's absmax is representable, so its level is exactly ±qmax.
    assert levels.round().abs().amax(dim=1).eq(q_max).all()


@pytest.mark.parametrize("bitwidth", BITWIDTHS)
def test_distinct_levels_per_channel_at_most_2b_minus_1(bitwidth):
    """A symmetric b-bit code has 2^b - 1 levels (−qmax..qmax); no channel may use more."""
    w = _weights(rows=8, cols=1024)
    wq = _quantized(w, bitwidth)
    counts = [len(torch.unique(row)) for row in wq]
    assert max(counts) <= 2**bitwidth - 1
    if bitwidth <= 4:  # 1024 Gaussian inputs fill every level of a small code
        assert max(counts) == 2**bitwidth - 1


def test_8bit_error_far_smaller_than_2bit():
    """More bits, finer grid: the 8-bit error is ~qmax ratio (127x) smaller than 2-bit."""
    w = _weights(rows=32, cols=256)
    err2 = (w - _quantized(w, 2)).abs().mean()
    err8 = (w - _quantized(w, 8)).abs().mean()
    errs = [(w - _quantized(w, b)).abs().mean() for b in BITWIDTHS]
    assert err8 < err2 / 50
    assert all(a > b for a, b in itertools.pairwise(errs))


# Hand-built 3-bit case (qmax = 3), no rounding ties anywhere.
W_HAND = torch.tensor([[3.0, -1.0, 0.4, 2.2],
                       [0.3, 0.9, -0.6, 0.2]])


def test_per_channel_scales_on_hand_built_matrix():
    """Row scales 3/3 = 1 and 0.9/3 = 0.3: the small row keeps its resolution."""
    expected = torch.tensor([[3.0, -1.0, 0.0, 2.0],
                             [0.3, 0.9, -0.6, 0.3]])
    torch.testing.assert_close(_quantized(W_HAND, 3), expected, rtol=0, atol=1e-6)


def test_per_tensor_scale_on_hand_built_matrix():
    """One scale 3/3 = 1 for the whole matrix: the small row collapses to coarse levels."""
    expected = torch.tensor([[3.0, -1.0, 0.0, 2.0],
                             [0.0, 1.0, -1.0, 0.0]])
    torch.testing.assert_close(_quantized(W_HAND, 3, per_channel=False), expected,
                               rtol=0, atol=1e-6)


def test_grouped_scales_on_hand_built_matrix():
    """group_size 2: each pair of inputs inside a row has its own scale."""
    s = 2.2 / 3
    expected = torch.tensor([[3.0, -1.0, s, 2.2],
                             [0.3, 0.9, -0.6, 0.2]])
    torch.testing.assert_close(_quantized(W_HAND, 3, group_size=2), expected,
                               rtol=0, atol=1e-6)


def test_trailing_partial_group_is_its_own_group():
    """group_size 3 on 4 inputs: groups of 3 and 1; the lone input is exact (its own absmax)."""
    expected = torch.tensor([[3.0, -1.0, 0.0, 2.2],
                             [0.3, 0.9, -0.6, 0.2]])
    torch.testing.assert_close(_quantized(W_HAND, 3, group_size=3), expected,
                               rtol=0, atol=1e-6)


def test_group_size_at_least_row_length_is_per_channel():
    w = _weights()
    assert torch.equal(_quantized(w, 4, group_size=64), _quantized(w, 4))
    assert torch.equal(_quantized(w, 4, group_size=1000), _quantized(w, 4))


def test_grouped_error_bound_uses_group_scale():
    """Each element is within half its own group's step."""
    w = _weights(cols=50)  # 50 = 3 groups of 16 + a trailing group of 2
    wq = _quantized(w, 4, group_size=16)
    bounds = []
    for start in range(0, 50, 16):
        block = w[:, start:start + 16]
        bounds.append((block.abs().amax(1, keepdim=True) / qmax(4)).expand_as(block))
    scale = torch.cat(bounds, dim=1)
    assert (w - wq).abs().le(scale / 2 * (1 + 1e-5) + 1e-12).all()


def test_conv1d_is_quantized_per_output_column_like_transposed_linear():
    """GPT-2 Conv1D stores [in, out]; its output channels are columns, as a Linear's rows."""
    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=40)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-2, 0, 6))  # very different column (channel) scales
    linear = torch.nn.Linear(40, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
    fake_quantize_(linear.weight, 4)
    conv_weight = conv.weight.detach().clone()
    fake_quantize_(conv.weight, 4, transposed=True)
    assert torch.equal(conv.weight, linear.weight.t())
    # Quantizing along the wrong axis would give something else.
    assert not torch.equal(_quantized(conv_weight, 4), conv.weight)


def test_clamp_ratio_clips_outliers_and_refines_the_rest():
    """Scale from the 99th-percentile |w|: the outlier clips to that value, the rest gain."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 100, generator=g) * 0.01
    w[:, 17] = torch.tensor([10.0, -10.0, 7.0, -3.0])
    clipped = _quantized(w, 4, clamp_ratio=0.99)
    plain = _quantized(w, 4)
    reference = w.abs().sort(dim=1).values[:, 98]  # nearest rank: ceil(0.99 * 100) = 99th
    torch.testing.assert_close(clipped[:, 17].abs(), reference, rtol=1e-6, atol=0)
    assert clipped[:, 17].sign().eq(w[:, 17].sign()).all()
    others = torch.ones(100, dtype=torch.bool)
    others[17] = False
    err_clipped = (w - clipped)[:, others].abs()
    assert err_clipped.le(reference.unsqueeze(1) / qmax(4) / 2 * (1 + 1e-5)).all()
    assert err_clipped.mean() < (w - plain)[:, others].abs().mean() / 4


@pytest.mark.parametrize(("ratio", "rank"), [(0.07, 7), (0.9, 90), (0.985, 99), (0.981, 99),
                                             (0.005, 1), (1e-9, 1), (1.0, 100)])
def test_clamp_reference_is_the_nearest_rank_quantile(ratio, rank):
    """The ceil(p*n)-th smallest |w| (an actual weight), immune to 0.07*100 = 7.000000000000001."""
    absw = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float().add(1)
    absw = absw.unsqueeze(0)  # 1..100 shuffled
    assert reference_magnitude(absw, ratio).item() == rank


def test_clamp_ratio_one_equals_absmax():
    w = _weights()
    assert torch.equal(_quantized(w, 3, clamp_ratio=1.0), _quantized(w, 3))


@pytest.mark.parametrize("kwargs", [{}, {"group_size": 8}, {"per_channel": False},
                                    {"clamp_ratio": 0.5}])
def test_all_zero_rows_and_groups_stay_zero(kwargs):
    """A zero scale never divides: zero rows and groups stay exactly zero, nothing is NaN."""
    w = _weights(cols=32)
    w[2] = 0.0
    w[5, 8:16] = 0.0
    wq = _quantized(w, 4, **kwargs)
    assert torch.isfinite(wq).all()
    assert wq[2].eq(0).all()
    if kwargs.get("group_size"):
        assert wq[5, 8:16].eq(0).all()
    assert torch.equal(_quantized(torch.zeros(3, 7), 2, **kwargs), torch.zeros(3, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [{}, {"group_size": 16}, {"clamp_ratio": 0.9},
                                    {"per_channel": False}, {"group_size": 24,
                                                             "clamp_ratio": 0.8}])
def test_quantizing_twice_gives_identical_weights(dtype, kwargs):
    """Idempotence: a quantized weight is a fixed point, bit for bit, in every dtype."""
    for bitwidth in (2, 4, 8):
        once = _quantized(_weights(cols=72).to(dtype), bitwidth, **kwargs)
        twice = _quantized(once, bitwidth, **kwargs)
        assert torch.equal(once, twice), (bitwidth, dtype, kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"group_size": 10}, {"per_channel": False},
                                    {"clamp_ratio": 0.95}])
@pytest.mark.parametrize("transposed", [False, True])
def test_chunking_does_not_change_the_result(kwargs, transposed):
    """Bounded-memory chunks (here a few rows each) give the same weights as one pass."""
    w = _weights(rows=30, cols=40)
    w = w.t().contiguous() if transposed else w
    one = _quantized(w, 4, transposed=transposed, **kwargs)
    many = _quantized(w, 4, transposed=transposed, chunk_elements=100, **kwargs)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_preserved_and_error_reported_in_that_dtype(dtype):
    w = _weights().to(dtype)
    out = w.clone()
    err = fake_quantize_(out, 8)
    assert out.dtype == dtype
    assert err == pytest.approx(float((out.float() - w.float()).abs().max()))
    # ŵ is the float32 result rounded once to the dtype.
    assert torch.equal(out, quantize_rows(w.float(), 8).to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weight_is_quantized_on_its_device():
    """The math runs where the weight lives; dtype and device are kept, the bound still holds."""
    w = _weights().to("cuda", torch.float16)
    out = w.clone()
    fake_quantize_(out, 4, group_size=16)
    assert out.device == w.device and out.dtype == torch.float16
    ref = _quantized(w.cpu(), 4, group_size=16)
    step = w.float().abs().amax().item() / qmax(4)
    assert (out.cpu().float() - ref.float()).abs().max() <= step


# --- Editing models ----------------------------------------------------------------------

ARCHS = {
    # fixture, loader, modules per scope (2 blocks each)
    "gpt2": ("tiny_gpt2_dir", AutoModelForCausalLM, {"attn": 4, "ffn": 4}),
    "llama": ("tiny_llama_dir", AutoModelForCausalLM, {"attn": 8, "ffn": 6}),
    "bert": ("tiny_bert_dir", AutoModelForMaskedLM, {"attn": 8, "ffn": 4}),
}


def _load(request, arch: str, **kwargs) -> torch.nn.Module:
    fixture, auto, _ = ARCHS[arch]
    path = request.getfixturevalue(fixture)
    return auto.from_pretrained(path, **kwargs).eval()


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scope", ["attn", "ffn", "all"])
def test_scope_selects_only_its_families(request, arch, scope):
    """attn edits only attention, ffn only MLP, all both; nothing else moves: embeddings,
    lm_head / MLM head (tied or not), pooler, norms and every bias stay bit-identical."""
    model = _load(request, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = apply_quant_rtn(model, QuantRTNPlan(bitwidth=4, scope=scope))

    counts = ARCHS[arch][2]
    expected = counts["attn"] + counts["ffn"] if scope == "all" else counts[scope]
    assert len(result.modules_changed) == expected
    allowed = {"attn": {Family.ATTN}, "ffn": {Family.FFN}, "all": {Family.ATTN, Family.FFN}}
    assert {family_of(n) for n in result.modules_changed} == allowed[scope]

    changed = _changed(before, model)
    assert changed == {f"{n}.weight" for n in result.modules_changed}
    assert not any(k.endswith(".bias") for k in changed)
    assert not any(family_of(k) in (Family.EMBED, Family.OTHER) for k in changed)
    assert result.params_changed == sum(before[f"{n}.weight"].numel()
                                        for n in result.modules_changed)
    assert 0 < result.max_abs_error < 1
    assert isinstance(result, EditResult) and result.name == "quant_rtn"
    assert result.plan == QuantRTNPlan(bitwidth=4, scope=scope).to_dict()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_weights_tied_to_embeddings_are_never_edited(request, arch):
    """GPT-2 lm_head and the BERT MLM decoder share the token embedding; it must not move."""
    model = _load(request, arch)
    out_emb = model.get_output_embeddings().weight
    assert out_emb is model.get_input_embeddings().weight  # the fixtures do tie them
    before = out_emb.detach().clone()
    apply_quant_rtn(model, QuantRTNPlan(bitwidth=2))
    assert torch.equal(out_emb, before)


def test_tied_weight_inside_a_block_is_skipped():
    """Even a block Linear whose weight *is* an embedding's is left alone."""
    model = _TinyNet()
    model.h[0].mlp.c_fc.weight = model.wte.weight
    names = [n for n, _ in quantizable_modules(model, "all")]
    assert "h.0.mlp.c_fc" not in names and "h.0.attn.q_proj" in names


def test_gpt2_conv1d_quantized_per_output_channel_in_the_model(request):
    """In the model too, c_attn ([in, out]) gets one scale per output column."""
    model = _load(request, "gpt2")
    module = model.transformer.h[0].attn.c_attn
    w = module.weight.detach().clone()
    apply_quant_rtn(model, QuantRTNPlan(bitwidth=3, scope="attn"))
    assert torch.equal(module.weight, quantize_rows(w.t(), 3).t())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_max_modules_takes_the_first_n_in_model_order(request, arch):
    model = _load(request, arch)
    order = [n for n, _ in quantizable_modules(model, "all")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = apply_quant_rtn(model, QuantRTNPlan(max_modules=3))
    assert result.modules_changed == tuple(order[:3])
    assert _changed(before, model) == {f"{n}.weight" for n in order[:3]}
    # More than available is simply all of them.
    assert len(apply_quant_rtn(_load(request, arch), QuantRTNPlan(max_modules=999))
               .modules_changed) == len(order)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_dtype_is_preserved(request, dtype):
    model = _load(request, "llama", dtype=dtype)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = apply_quant_rtn(model, QuantRTNPlan(bitwidth=4))
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes
    assert _changed(before, model) == {f"{n}.weight" for n in result.modules_changed}
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_checkpoint_on_disk_is_unchanged(request):
    """The edit works on the loaded copy only: every file keeps its sha256."""
    path = request.getfixturevalue("tiny_gpt2_dir")

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path(path).iterdir()) if p.is_file()}

    before = digests()
    model = AutoModelForCausalLM.from_pretrained(path)
    apply_quant_rtn(model, QuantRTNPlan(bitwidth=2))
    assert digests() == before


def test_8bit_edit_keeps_outputs_close_and_2bit_does_not(request):
    """Sanity on a real forward: INT8 barely moves the logits, 2-bit moves them a lot."""
    ids = torch.arange(1, 33).unsqueeze(0)
    deltas = {}
    with torch.inference_mode():
        reference = _load(request, "llama")(ids).logits
        for bits in (8, 2):
            model = _load(request, "llama")
            apply_quant_rtn(model, QuantRTNPlan(bitwidth=bits))
            deltas[bits] = float((model(ids).logits - reference).abs().max())
    assert deltas[8] < deltas[2] / 20


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.q_proj = torch.nn.Linear(8, 8)
        self.mlp = torch.nn.Module()
        self.mlp.c_fc = torch.nn.Linear(8, 8, bias=False)


class _TinyNet(torch.nn.Module):
    """A block plus a head whose leaf name looks like attention (RoBERTa-style classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(8, 8)
        self.h = torch.nn.ModuleList([_Block()])
        self.classifier = torch.nn.Module()
        self.classifier.out_proj = torch.nn.Linear(8, 2)


def test_heads_outside_blocks_are_never_edited():
    assert family_of("classifier.out_proj") is Family.ATTN  # by name alone it would match
    names = [n for n, _ in quantizable_modules(_TinyNet(), "attn")]
    assert names == ["h.0.attn.q_proj"]


def test_scope_matching_nothing_is_an_input_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InputError, match=r"scope 'all' matches no Linear/Conv1D weight"):
        apply_quant_rtn(model, QuantRTNPlan())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_non_float_weight_is_an_input_error_and_nothing_is_edited():
    model = _TinyNet()
    before = model.h[0].attn.q_proj.weight.detach().clone()
    model.h[0].mlp.c_fc.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.int8),
                                                    requires_grad=False)
    with pytest.raises(InputError, match=r"cannot quantize h\.0\.mlp\.c_fc: its weight is "
                                         r"torch\.int8"):
        apply_quant_rtn(model, QuantRTNPlan())
    assert torch.equal(model.h[0].attn.q_proj.weight, before)


# --- Plans --------------------------------------------------------------------------------


def test_plan_from_whole_edit_section_or_plan_mapping():
    section = {"name": "quant_rtn", "plan": {"bitwidth": 4, "group_size": 64, "scope": "ffn",
                                             "clamp_ratio": 1, "max_modules": 2}}
    plan = edit_plan_from_config(section)
    assert plan == edit_plan_from_config(section["plan"])
    assert plan == QuantRTNPlan(bitwidth=4, group_size=64, scope="ffn", clamp_ratio=1.0,
                                max_modules=2)
    assert isinstance(plan.clamp_ratio, float)
    assert edit_plan_from_config(None) == QuantRTNPlan()
    assert edit_plan_from_config({"name": "quant_rtn"}) == QuantRTNPlan()
    assert edit_plan_from_config({}) == QuantRTNPlan(bitwidth=8, per_channel=True, scope="all")


@pytest.mark.parametrize(("config", "message"), [
    ({"bitwidth": 1}, "edit.plan.bitwidth must be an integer from 2 to 8, got 1"),
    ({"bitwidth": 9}, "edit.plan.bitwidth must be an integer from 2 to 8, got 9"),
    ({"bitwidth": 4.0}, "edit.plan.bitwidth must be an integer from 2 to 8, got 4.0"),
    ({"bitwidth": True}, "edit.plan.bitwidth must be an integer from 2 to 8, got True"),
    ({"group_size": 0}, "edit.plan.group_size must be an integer >= 1 or null, got 0"),
    ({"clamp_ratio": 0}, "edit.plan.clamp_ratio must be a number in (0, 1] or null, got 0"),
    ({"clamp_ratio": 1.5}, "edit.plan.clamp_ratio must be a number in (0, 1] or null, got 1.5"),
    ({"scope": "mlp"}, "edit.plan.scope must be one of 'attn', 'ffn', 'all', got 'mlp'"),
    ({"per_channel": "yes"}, "edit.plan.per_channel must be true or false, got 'yes'"),
    ({"max_modules": 0}, "edit.plan.max_modules must be an integer >= 1 or null, got 0"),
    ({"per_channel": False, "group_size": 32},
     "edit.plan.group_size needs per_channel: true (groups lie inside output channels)"),
    ({"bitwdith": 4}, "unknown key 'edit.plan.bitwdith'; did you mean 'bitwidth'?"),
    ({"name": "quant_rtn", "plan": {"scop": "attn"}},
     "unknown key 'edit.plan.scop'; did you mean 'scope'?"),
    ({"name": "quant_rtn", "bitwidth": 4},
     "unknown key 'edit.bitwidth'; valid keys: name, plan (plan settings go under edit.plan)"),
    ({"name": "prune"}, "edit.name: unknown edit 'prune'; this parser reads 'quant_rtn'"),
    ({"name": "quant_rtn", "plan": [4]}, "edit.plan must be a mapping, got list"),
])
def test_invalid_plans_name_the_key_and_the_rule(config, message):
    with pytest.raises(InputError) as info:
        edit_plan_from_config(config)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_registry_lists_quant_rtn_and_rejects_unknown_names():
    edit = get_edit("quant_rtn")
    assert list(EDITS) == ["quant_rtn"]
    assert edit.parse_plan({"bitwidth": 4}) == QuantRTNPlan(bitwidth=4)
    assert edit.apply is apply_quant_rtn
    with pytest.raises(InputError, match=r"^unknown edit 'gptq'; available: quant_rtn$"):
        get_edit("gptq")


def test_listing_and_plan_parsing_do_not_import_torch():
    """`invarlock plugins edits` and config validation must work on a core (torch-less) install."""
    code = ("import sys, invarlock.edits as e; e.get_edit('quant_rtn').parse_plan({'bitwidth': 4});"
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
