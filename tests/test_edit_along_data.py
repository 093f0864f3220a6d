"""The edit size along the data: the baseline's input sketch, the effective coordinates its
inputs are taken in, and why it separates GPTQ's error from rearranged rows."""

from __future__ import annotations

import math
import mmap

import numpy as np
import pytest
import torch

from invarlock.calibration import zoo
from invarlock.calibration.zoo_gptq import gptq
from invarlock.guards.measure import sketch
from invarlock.guards.measure.fold import effective, input_scales, output_scales, transform_plan
from invarlock.guards.measure.rmt import linear_modules


def _inputs(n: int, d: int, seed: int) -> np.ndarray:
    """Rows whose second moment falls off steeply, as a language model's inputs do."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = 10.0 ** -np.linspace(0, 2.5, d)
    return (rng.normal(size=(n, d)) * scales) @ basis.T


def _along(delta: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    value = sketch.edit_along_data(torch.from_numpy(delta).float(), torch.from_numpy(w).float(),
                                   torch.from_numpy(b))
    assert value is not None
    return value


def test_gptq_error_is_large_in_weight_space_and_small_along_the_data():
    d, out = 128, 96
    x = _inputs(512, d, 0)
    w = np.random.default_rng(1).normal(size=(out, d))
    b = sketch.sketch(x[:sketch.SKETCH_ROWS].astype(np.float32))
    hessian = torch.from_numpy(x.T @ x)
    q_gptq = gptq(torch.from_numpy(w).float(), hessian, 4, None).double().numpy()
    q_rtn = zoo.rtn(torch.from_numpy(w).float(), 4, None).double().numpy()
    sigma = np.linalg.norm(w, 2)
    weight_space = {k: np.linalg.norm(q - w, 2) / sigma for k, q in
                    (("gptq", q_gptq), ("rtn", q_rtn))}
    along = {k: _along(q - w, w, b) for k, q in (("gptq", q_gptq), ("rtn", q_rtn))}
    permuted = w[np.random.default_rng(2).permutation(out)]
    # GPTQ moves the weights further than RTN, onto inputs the data barely drives ...
    assert weight_space["gptq"] > 1.5 * weight_space["rtn"]
    # ... so along the data it is the smaller edit, and a permutation is 5x beyond either
    assert along["gptq"] < along["rtn"]
    assert _along(permuted - w, w, b) > 5 * max(along.values())


def test_a_sketch_survives_float16_storage_whatever_the_input_scale():
    x = _inputs(128, 64, 3).astype(np.float32) * 1e5   # float16 overflows at 65504
    w = np.random.default_rng(4).normal(size=(32, 64)).astype(np.float32)
    delta = w[::-1] - w
    b = sketch.sketch(x)
    stored = sketch.decode(sketch.encode(b)).numpy()
    assert np.isfinite(stored).all()
    assert _along(delta, w, stored) == pytest.approx(_along(delta, w, b), rel=1e-2)


def _store(*parts: np.ndarray, capacity: int = 64) -> sketch.RowStore:
    store = sketch.RowStore(capacity)
    for part in parts:
        store.add(part)
    return store


def test_modules_reading_one_input_share_one_sketch():
    x = _inputs(64, 16, 5).astype(np.float32)
    shared = _store(x[:32], x[32:])
    table, index = sketch.sketches({"q": shared, "k": shared, "v": _store(x), "o": _store(2 * x)})
    # q and k hold one store, v equal rows in another: one sketch for the three
    assert len(table) == 2 and index["q"] == index["k"] == index["v"] != index["o"]


def test_a_row_store_keeps_rows_in_order_and_grows_past_its_capacity():
    x = _inputs(40, 8, 6).astype(np.float32)
    store = _store(x[:16], x[16:24], capacity=24)
    np.testing.assert_array_equal(store.array(), x[:24])
    store.add(x[24:])  # a batch seen twice: more rows than the sampler planned
    np.testing.assert_array_equal(store.array(), x)
    assert store.array().flags.writeable and store.array().dtype == np.float32
    assert sketch.RowStore(4).array().shape == (0, 0)
    owner = store.array()
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    assert isinstance(owner, mmap.mmap)  # kept off the heap the batches' activations use


@pytest.mark.parametrize("rescale", ["normfold_all", "awq_scale", "qk_scale", "vo_scale"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_effective_matrix_reads_its_input_over_the_input_scales(
        arch, rescale, tiny_llama_dir, tiny_gpt2_dir):
    """W_eff·(x / input_scales) is the stored weight's output times the producer's balancing
    scale, for every block linear, so the edit along the data is taken on the same function
    whatever rescaling the subject carries."""
    from transformers import AutoModelForCausalLM

    folder = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        try:
            zoo.BENIGN[rescale](model, 0)
        except zoo.NotApplicable:
            pytest.skip(f"{rescale} does not apply to {arch}")
    params = dict(model.named_parameters(remove_duplicate=False))

    def get(n: str) -> torch.Tensor:
        return params[n].detach()

    plan = transform_plan(model)
    scaled = 0
    for name, module in linear_modules(model, ("attn", "ffn", "embed", "other")):
        conv1d = type(module).__name__ == "Conv1D"
        weight = f"{name}.weight"
        w = get(weight).float()
        w_eff = effective(weight, get, plan)
        if conv1d:
            w, w_eff = w.T, w_eff.T
        x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
        factor = input_scales(weight, get, plan, conv1d=conv1d)
        out_factor = output_scales(weight, get, plan, conv1d=conv1d)
        seen = x if factor is None else x / factor
        expected = x @ w.T
        if out_factor is not None:
            expected = expected * out_factor
        torch.testing.assert_close(seen @ w_eff.T, expected, rtol=1e-4, atol=1e-4)
        scaled += factor is not None
    assert scaled > 0  # norm folds and consumers of balanced pairs were exercised


def test_a_cached_state_cannot_talk_a_changed_module_down(tiny_gpt2_dir):
    """What a planted cache entry can and cannot do to the spectral probe: an unreadable
    sketch leaves that module unmeasured along the data (recorded as null, no crash), and a
    σ_b that is not the baseline files' own is replaced by the files' (so a ×1.5 matrix
    still reads +50%)."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.spectral import SpectralProbe
    from invarlock.models.source import weight_files

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    probe = SpectralProbe({})
    probe.baseline_loaded(model)
    state = probe.baseline_state()
    grown, permuted = "transformer.h.1.mlp.c_proj.weight", "transformer.h.0.mlp.c_fc.weight"
    d_in = {m["name"]: m["shape"][0] for m in state["modules"]}  # Conv1D: [in, out]
    state["sketches"] = [sketch.encode(np.eye(d_in[grown], dtype=np.float32)),
                         {"shape": [2, 2], "float16": "not base64!"}]
    state["sketch_index"] = {grown: {"sketch": 0, "conv1d": True},
                             permuted: {"sketch": 1, "conv1d": True}}
    for m in state["modules"]:
        if m["name"] == grown:
            m["sigma"] *= 1.5  # the subject's σ, as a planted entry would claim
    with torch.no_grad():
        model.get_submodule("transformer.h.1.mlp.c_proj").weight.mul_(1.5)
        w = model.get_submodule("transformer.h.0.mlp.c_fc").weight
        w.copy_(w[:, torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))])
    ctx = SubjectContext(info=None, model=model, config={}, baseline_config={},
                         baseline_files=weight_files(tiny_gpt2_dir), tokenizer_hashes=("", ""),
                         base_model_prefix=model.base_model_prefix)
    probe.subject_loaded(ctx, state)
    measured = {m["name"]: m for m in probe.measure(ctx, state)["modules"]}
    assert measured[grown]["sigma_subject"] == pytest.approx(
        1.5 * measured[grown]["sigma_baseline"], rel=1e-4)
    assert measured[grown]["sigma_baseline_cached"] == pytest.approx(
        1.5 * measured[grown]["sigma_baseline"], rel=1e-4)
    assert measured[grown]["edit_along_data"] == pytest.approx(0.5, rel=1e-2)
    assert measured[permuted]["changed"] and measured[permuted]["edit_along_data"] is None


def test_modules_fed_by_one_norm_keep_one_copy_of_their_rows(tiny_llama_dir, sonnets_path):
    """q/k/v (and gate/up) read one norm's output: the tap keeps their sampled rows once,
    and the state holds one sketch for them; o and down read their own inputs."""
    from transformers import AutoModelForCausalLM

    from tests.guardkit import sketched_spectral_baseline

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    probe, windows, tap = sketched_spectral_baseline(model, tiny_llama_dir, sonnets_path)
    layer = "model.layers.0"
    q, k, v = (tap.rows[f"{layer}.self_attn.{m}_proj"] for m in "qkv")
    gate, up, down = (tap.rows[f"{layer}.mlp.{m}_proj"] for m in ("gate", "up", "down"))
    assert q is k is v and gate is up and down is not up  # one store per distinct input
    assert q.array().shape[0] == windows.n * math.ceil(sketch.SKETCH_ROWS / windows.n)
    assert not np.shares_memory(q.array(), gate.array())
    state = probe.baseline_state()
    index = state["sketch_index"]
    layers = model.config.num_hidden_layers
    assert len(state["sketches"]) == 4 * layers  # attention in, o in, MLP in, down in
    sketch_of = {name: entry["sketch"] for name, entry in index.items()}
    assert sketch_of[f"{layer}.self_attn.q_proj.weight"] == \
        sketch_of[f"{layer}.self_attn.v_proj.weight"]
    # each module has its own gain along the shared sketch
    assert index[f"{layer}.self_attn.q_proj.weight"]["data_sigma"] != \
        index[f"{layer}.self_attn.v_proj.weight"]["data_sigma"]
