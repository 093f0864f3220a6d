"""σ along the data: what the spectral guard gates for a block linear with an input sketch.

GPTQ's error feedback can raise a matrix's weight-space σ by 175% on input channels the text
never drives while its outputs stay put; the gate compares σ_max(W_eff·C̃^½) instead, C̃ the
sampled inputs' second moment (top directions plus the energy they leave out per channel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invarlock.guards import spectral
from invarlock.guards.measure import sketch
from invarlock.policy import tiers

BALANCED = tiers()["balanced"]["guards"]["spectral"]  # the shipped policy


def _rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * 10.0 ** -np.linspace(0, 2, d)) @ basis.T).astype(
        np.float32)


def test_the_data_matrix_is_the_gain_along_the_kept_second_moment():
    """σ_max([W Bᵀ | W·diag(d)]) against σ_max(W·C̃^½) from C̃'s own eigendecomposition, and
    C̃ keeps every channel's energy on its diagonal."""
    x = _rows(128, 48, 0)
    w = torch.from_numpy(np.random.default_rng(1).normal(size=(40, 48)).astype(np.float32))
    entry = sketch.encode(sketch.sketch(x, rank=8), sketch.energy(x))
    b, energy = sketch.decode(entry), sketch.decode_energy(entry)
    d = sketch.residual_scales(b, energy)
    c = (b.T @ b + torch.diag(d ** 2)).double()
    torch.testing.assert_close(torch.diagonal(c), energy.double(), rtol=2e-3, atol=1e-6)
    evals, evecs = torch.linalg.eigh(c)
    root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    expected = float(torch.linalg.matrix_norm(w.double() @ root, 2))
    measured = float(torch.linalg.matrix_norm(sketch.data_matrix(w, b, d), 2))
    assert measured == pytest.approx(expected, rel=1e-5)
    # the energy is on the decoded sketch's scale, whatever the inputs' own scale
    big = sketch.encode(sketch.sketch(x * 1e4, rank=8), sketch.energy(x * 1e4))
    torch.testing.assert_close(sketch.decode_energy(big), energy, rtol=1e-3, atol=1e-9)


def test_the_gain_along_the_data_is_taken_without_forming_the_data_matrix():
    """`DataMatrix`'s row products are the formed matrix's, and the iterative σ of it is the
    formed matrix's exact σ: not forming [W Bᵀ | W·diag(d)] changes no gated value. A sketch
    with no kept direction (r = 0) leaves the per-channel part alone."""
    from invarlock.guards.measure.weights import exact_top, top_singular

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(60, 48, generator=gen)
    w[:, 5] *= 20.0  # a dominant input channel: a top vector that is not generic
    for rank in (8, 0):
        x = _rows(128, 48, 4)
        entry = sketch.encode(sketch.sketch(x, rank=rank) if rank else np.zeros((0, 48),
                              dtype=np.float32), sketch.energy(x))
        b = sketch.decode(entry)
        d = sketch.residual_scales(b, sketch.decode_energy(entry))
        dense = sketch.data_matrix(w, b, d)
        m = sketch.DataMatrix(w, b, d)
        assert m.shape == tuple(dense.shape)
        q, z = torch.randn(3, m.shape[1], generator=gen), torch.randn(3, 60, generator=gen)
        torch.testing.assert_close(m.by_transpose(q), q @ dense.T, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(m.by(z), z @ dense, rtol=1e-5, atol=1e-4)
        exact = exact_top(dense)
        iterative = top_singular(m, seed=0, tol=1e-7, exact_max_elements=0)
        assert iterative.iterations > 0  # the products' path, not the formed matrix's
        assert iterative.sigma == pytest.approx(exact.sigma, rel=1e-5)
        assert abs(float(iterative.vector @ exact.vector)) == pytest.approx(1.0, abs=1e-4)
        assert top_singular(m, seed=0).sigma == exact.sigma  # small: formed, exact


def test_a_stored_energy_that_does_not_fit_is_refused():
    x = _rows(32, 8, 2)
    entry = sketch.encode(sketch.sketch(x), sketch.energy(x))
    assert sketch.decode_energy({k: v for k, v in entry.items() if k != "energy"}) is None
    with pytest.raises(ValueError, match="8 values for 9 inputs"):
        sketch.decode_energy({**entry, "shape": [entry["shape"][0], 9]})
    negative = sketch.encode(sketch.sketch(x), -sketch.energy(x))
    with pytest.raises(ValueError, match="non-negative"):
        sketch.decode_energy(negative)


def _measured(baseline_dir, windows_dir, sonnets_path, edit, tamper=None):
    """The spectral probe's records and decision for the saved baseline edited by `edit`
    (with `tamper`, the baseline state is changed first, as a planted cache entry would)."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.models.source import weight_files
    from tests.guardkit import sketched_spectral_baseline

    model = AutoModelForCausalLM.from_pretrained(baseline_dir).eval()
    probe, windows, _ = sketched_spectral_baseline(model, windows_dir, sonnets_path)
    state = probe.baseline_state()
    if tamper is not None:
        tamper(state)
    ids = torch.from_numpy(windows.input_ids[:2])
    with torch.no_grad():
        before = model(ids).logits
        edit(model)
        after = model(ids).logits
    ctx = SubjectContext(info=None, model=model, config={}, baseline_config={},
                         baseline_files=weight_files(baseline_dir), tokenizer_hashes=("", ""),
                         base_model_prefix=model.base_model_prefix)
    probe.subject_loaded(ctx, state)
    measurements = probe.measure(ctx, state)
    modules = {m["name"]: m for m in measurements["modules"]}
    moved = float((after - before).abs().max())
    return modules, spectral.decide(measurements, BALANCED), moved


@pytest.fixture(scope="module")
def dead_channel(tiny_llama_dir, tmp_path_factory) -> tuple:
    """The tiny LLaMA with down_proj's input channel 3 never driven (gate_proj's row 3 is
    zero: silu(0) = 0), saved as a baseline."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3].zero_()
    folder = tmp_path_factory.mktemp("dead-channel")
    model.save_pretrained(folder)
    return folder, 3


def _spike(channel: int):
    """A large column added at one input channel of layer 1's down_proj: its effective σ
    (balanced against up_proj, which takes half of the change) triples."""
    def edit(model) -> None:
        w = model.model.layers[1].mlp.down_proj.weight
        column = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0))
        w[:, channel] += 40 * float(torch.linalg.matrix_norm(w, 2)) * column / column.norm()
    return edit


def test_a_change_where_the_data_never_goes_is_gated_by_the_data_not_the_weights(
        dead_channel, tiny_llama_dir, sonnets_path):
    """The GPTQ pattern, made exact: a spike on an input channel the data never drives
    triples weight-space σ, leaves every output as it was, and the guard passes on σ along
    the data; the same spike on a channel the data drives fails it."""
    folder, dead = dead_channel
    name = "model.layers.1.mlp.down_proj.weight"
    records, decision, moved = _measured(folder, tiny_llama_dir, sonnets_path, _spike(dead))
    record = records[name]
    assert moved == 0.0  # the function is unchanged
    assert record["sigma_basis"] == "data"
    assert record["sigma_subject"] / record["sigma_baseline"] - 1 > 2.0
    assert record["sigma_data_subject"] == pytest.approx(record["sigma_data_baseline"],
                                                         rel=1e-4)
    # the pair's balance puts half of the change on up_proj's row; along the data the
    # whole pair's magnitude sits on down_proj's unused column
    up = records["model.layers.1.mlp.up_proj.weight"]
    assert up["sigma_subject"] / up["sigma_baseline"] - 1 > 0.5
    assert up["sigma_data_subject"] == pytest.approx(up["sigma_data_baseline"], rel=1e-4)
    # so is the edit along the data, on both sides of the pair
    assert up["edit_along_data"] < 1e-4 and record["edit_along_data"] < 1e-4
    assert decision.passed, decision.reason
    family = decision.summary["families"]["ffn"]
    assert family["max_abs_change"] < 1e-3 and family["max_abs_change_weights"] > 2.0

    records, decision, moved = _measured(folder, tiny_llama_dir, sonnets_path,
                                         _spike(dead + 1))
    record = records[name]
    assert moved > 0.0
    assert record["sigma_data_subject"] / record["sigma_data_baseline"] - 1 > 0.5
    assert not decision.passed
    (finding,) = [f for f in decision.findings if f["module"] == name]
    assert finding["basis"] == "data" and "σ along the data changed" in finding["message"]


def test_a_module_without_a_gain_along_the_data_is_gated_in_weight_space():
    """A record without the data's σ (an embedding, a state cached before sketches kept
    channel energy) is scored on its weight-space σ."""
    base = {"family": "embed", "shape": [4, 4], "sigma_baseline": 1.0, "edit_size": 0.0,
            "edit_along_data": None}
    weights = {**base, "name": "embed.weight", "sigma_subject": 1.3, "sigma_basis": "weights"}
    data = {**base, "name": "other.weight", "family": "embed", "sigma_subject": 1.3,
            "sigma_basis": "data", "sigma_data_baseline": 2.0, "sigma_data_subject": 2.0}
    (w,), (d,) = (spectral.score_modules([m], 0.5, spectral.FAMILIES) for m in (weights, data))
    assert (w.basis, w.r) == ("weights", pytest.approx(0.3))
    assert (d.basis, d.r, d.weight_r) == ("data", 0.0, pytest.approx(0.3))
    assert not spectral.decide({"modules": [weights]}, BALANCED).passed
    assert spectral.decide({"modules": [data]}, BALANCED).passed


def test_a_planted_gain_along_the_data_cannot_hide_a_change(dead_channel, tiny_llama_dir,
                                                            sonnets_path):
    """The baseline's gain along the data comes from the cache: a lying σ is taken again from
    the files' matrix (it must hold along its cached vector), and a zero or unreadable one
    leaves the module gated in weight space with its edit along the data still measured."""
    folder, _ = dead_channel
    lying, zero, garbage = ("model.layers.0.self_attn.k_proj.weight",
                            "model.layers.1.self_attn.o_proj.weight",
                            "model.layers.0.mlp.down_proj.weight")

    def tamper(state):
        index = state["sketch_index"]
        index[lying]["data_sigma"] *= 0.5  # the subject's ×2 below would read as unchanged
        index[zero]["data_sigma"] = 0.0
        index[garbage]["data_vector"] = "not base64!"

    def double(model):
        for name in (lying, zero, garbage):
            model.get_submodule(name.removesuffix(".weight")).weight.mul_(2.0)

    records, decision, _ = _measured(folder, tiny_llama_dir, sonnets_path, double, tamper)
    assert records[lying]["sigma_basis"] == "data"
    assert records[lying]["sigma_data_baseline_cached"] == pytest.approx(
        0.5 * records[lying]["sigma_data_baseline"], rel=1e-4)
    assert records[lying]["sigma_data_subject"] > 1.5 * records[lying]["sigma_data_baseline"]
    for name in (zero, garbage):
        assert records[name]["sigma_basis"] == "weights"
        assert records[name]["edit_along_data"] > 0.3  # the balanced form: √2 − 1
    assert not decision.passed
    assert {lying, zero, garbage} <= {f["module"] for f in decision.findings}
