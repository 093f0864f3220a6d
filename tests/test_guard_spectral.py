"""Spectral guard: robust z, multiple testing and the decision, on synthetic σ values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from invarlock.guards import spectral

POLICY = {"sigma_quantile": 0.5, "deadband": 0.10, "max_caps": 2, "max_spectral_norm": None,
          "multiple_testing": {"method": "bh", "alpha": 0.05, "m": 4},
          "family_caps": {"attn": 3.0, "ffn": 3.0, "embed": 3.0, "other": 3.0}}


def modules(r_by_family: dict[str, list[float]], sigma: float = 2.0) -> list[dict]:
    out = []
    for family, rs in r_by_family.items():
        for i, r in enumerate(rs):
            out.append({"name": f"layers.{i}.{family}.weight", "family": family,
                        "sigma_baseline": sigma, "sigma_subject": sigma * (1 + r),
                        "edit_size": abs(r)})
    return out


def test_scale_half_quantile_is_mad_and_matches_normal_sigma():
    rng = np.random.default_rng(0)
    r = rng.normal(0.0, 0.3, 200_000)
    mad = np.median(np.abs(r - np.median(r)))
    assert spectral.robust_scale(r, 0.5) == pytest.approx(mad / norm.ppf(0.75))
    for q in (0.5, 0.8, 0.95):  # every quantile is a consistent estimator of σ
        assert spectral.robust_scale(r, q) == pytest.approx(0.3, rel=0.01)


def test_robust_z_ignores_one_huge_outlier():
    rng = np.random.default_rng(1)
    r = np.append(rng.normal(0.0, 1e-3, 99), 2.0)
    z = spectral.robust_z(r, 0.5)
    assert abs(z[-1]) > 1000
    assert np.max(np.abs(z[:-1])) < 4


def test_robust_z_of_identical_values_is_zero_and_finite():
    z = spectral.robust_z(np.zeros(7), 0.5)
    assert np.array_equal(z, np.zeros(7))
    z = spectral.robust_z(np.array([0.0, 0.0, 0.0, 2.0]), 0.5)
    assert np.isfinite(z).all() and z[-1] > 1e6


def test_benjamini_hochberg_matches_step_up_definition():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205])
    # k = 2 is the largest k with p_(k) <= k/8 * 0.05 (0.008 <= 0.0125; 0.039 > 0.01875).
    assert spectral.rejected(p, 0.05, "bh", 8).tolist() == [True, True] + [False] * 6
    assert spectral.rejected(p, 0.05, "bonferroni", 8).tolist() == [True] + [False] * 7
    # m larger than the number of p-values makes both stricter
    assert not spectral.rejected([0.02], 0.05, "bh", 4)[0]
    assert spectral.rejected([0.02], 0.05, "bh", 1)[0]
    with pytest.raises(ValueError, match="method"):
        spectral.rejected(p, 0.05, "holm", 8)


def test_identical_weights_pass_with_zero_change():
    d = spectral.decide({"modules": modules({"attn": [0.0] * 8, "ffn": [0.0] * 8})}, POLICY)
    assert d.passed and not d.findings
    assert d.summary["families"]["attn"]["max_abs_change"] == 0.0


def test_one_matrix_tripled_is_a_violation_and_fails():
    rng = np.random.default_rng(2)
    attn = list(rng.normal(0, 2e-4, 12))
    attn[5] = 2.0  # σ ×3
    d = spectral.decide({"modules": modules({"attn": attn, "ffn": list(rng.normal(0, 2e-4, 12))})},
                        POLICY)
    assert not d.passed
    assert [f["module"] for f in d.findings if f["kind"] == "violation"] == ["layers.5.attn.weight"]
    assert "layers.5.attn.weight" in d.reason
    assert d.summary["families"]["attn"]["rejected"] is True
    assert d.summary["families"]["attn"]["top_module"] == "layers.5.attn.weight"


def test_small_changes_inside_deadband_never_count_however_extreme_their_z():
    rng = np.random.default_rng(3)
    attn = list(rng.normal(0, 1e-5, 20))
    attn[0] = 0.09  # z is enormous, but a 9% change is inside the 10% deadband
    d = spectral.decide({"modules": modules({"attn": attn})}, POLICY)
    assert d.passed and d.summary["families"]["attn"]["top_z"] > 50  # scale floored at 0.001


def test_candidates_in_a_family_that_is_not_significant_are_budgeted_warnings():
    # Broad changes of 5-25% everywhere: a few exceed κ, but not significantly for 40 modules.
    rng = np.random.default_rng(4)
    ffn = list(rng.normal(0.15, 0.05, 40))
    d = spectral.decide({"modules": modules({"ffn": ffn})}, {**POLICY, "family_caps": {
        "attn": 3.0, "ffn": 1.5, "embed": 3.0, "other": 3.0}})
    kinds = [f["kind"] for f in d.findings]
    assert kinds and set(kinds) == {"warning"}
    assert d.passed == (len(kinds) <= POLICY["max_caps"])
    more = spectral.decide({"modules": modules({"ffn": ffn})}, {**POLICY, "max_caps": 100,
                           "family_caps": {"attn": 3.0, "ffn": 1.5, "embed": 3.0, "other": 3.0}})
    assert more.passed


def test_absolute_cap_and_scope():
    mods = modules({"attn": [0.0, 0.0, 0.01], "embed": [0.0]}, sigma=5.0)
    assert not spectral.decide({"modules": mods}, {**POLICY, "max_spectral_norm": 5.01}).passed
    assert spectral.decide({"modules": mods}, {**POLICY, "max_spectral_norm": 6.0}).passed
    scoped = spectral.decide({"modules": mods}, {**POLICY, "scope": ["embed"]})
    assert scoped.summary["modules"] == 1


def test_the_edit_along_the_data_fails_a_module_that_keeps_sigma_and_its_edit_size():
    """A permutation keeps σ and can stay under the edit-size limit (GPTQ's error feedback
    sets that one high); along the data it is as large as the outputs themselves."""
    mods = modules({"ffn": [0.0, 0.0, 0.0, 0.0]})
    for m in mods:
        m.update(edit_size=0.3, edit_along_data=0.05)
    mods[2].update(edit_along_data=0.5)
    mods[3].update(edit_along_data=None)  # no input sketch: nothing to gate on
    policy = {**POLICY, "edit_size_limit": 0.77, "edit_along_data_limit": 0.28}
    decision = spectral.decide({"modules": mods}, policy)
    assert not decision.passed
    (finding,) = decision.findings
    assert finding["module"] == mods[2]["name"] and "along the data" in finding["message"]
    assert finding["edit_along_data"] == 0.5 and "0.5 beyond the limit 0.28" in decision.reason
    assert spectral.decide({"modules": mods}, {**policy, "edit_along_data_limit": None}).passed
    mods[2].update(edit_along_data=0.2)
    assert spectral.decide({"modules": mods}, policy).passed


def test_bonferroni_is_stricter_than_bh_for_several_families():
    rng = np.random.default_rng(5)
    fams = {f: list(rng.normal(0, 1e-3, 10)) for f in ("attn", "ffn")}
    fams["attn"][0] = fams["ffn"][0] = 0.2
    # make the outliers moderate in z: widen the spread so z ~ 4.5
    fams["attn"][1:] = list(rng.normal(0, 0.03, 9))
    fams["ffn"][1:] = list(rng.normal(0, 0.03, 9))
    bh = spectral.decide({"modules": modules(fams)}, POLICY)
    bonf = spectral.decide({"modules": modules(fams)}, {
        **POLICY, "multiple_testing": {"method": "bonferroni", "alpha": 0.05, "m": 4}})
    assert bh.summary["families"]["attn"]["p_value"] == bonf.summary["families"]["attn"][
        "p_value"]
    assert sum(f["rejected"] for f in bh.summary["families"].values()) >= sum(
        f["rejected"] for f in bonf.summary["families"].values())


def test_unmeasured_section_fails_with_its_reason():
    d = spectral.decide({"evaluated": False, "why": "the invariants failed"}, POLICY)
    assert not d.passed and "invariants failed" in d.reason


def test_families_too_small_for_a_z_fail_on_any_change_beyond_the_deadband():
    mods = modules({"attn": [0.0] * 6, "embed": [0.0, 0.3]})
    d = spectral.decide({"modules": mods}, POLICY)
    assert not d.passed and d.findings[0]["module"] == "layers.1.embed.weight"
    assert d.summary["families"]["embed"]["robust_z"] is False
    assert spectral.decide({"modules": modules({"embed": [0.0, 0.05]})}, POLICY).passed


def _spike_orthogonal_to_top(w, factor: float = 2.0, skip: int = 3):
    """W + factor·σ1·x yᵀ with (x, y) a singular pair below the top `skip`: σ_max becomes
    about (1 + factor)·σ1 along a direction the baseline's top vectors are orthogonal to."""
    import torch

    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (w.double() + factor * s[0] * torch.outer(u[:, skip], vh[skip])).float()


@pytest.mark.parametrize("factor", [2.0, 0.4], ids=["tripled", "weak"])
@pytest.mark.parametrize("exact_limit", [0, 1 << 30], ids=["iterative", "exact"])
def test_orthogonal_spike_on_gate_and_q_proj_is_measured_as_the_exact_change(
        tiny_llama_dir, monkeypatch, exact_limit, factor):
    """A rank-1 spike orthogonal to the baseline's top singular vectors (σ ×3, or a few
    tens of percent); a power iteration warm-started at the baseline's top vector alone
    reports no change."""
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure import fold
    from invarlock.guards.measure import spectral as probe_module
    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.models.source import weight_files

    monkeypatch.setattr(probe_module, "EXACT_SVD_MAX_ELEMENTS", exact_limit)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    probe = probe_module.SpectralProbe({})
    probe.baseline_loaded(model)
    state = probe.baseline_state()
    targets = ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj")
    with torch.no_grad():
        for path in targets:
            w = model.get_submodule(path).weight
            w.copy_(_spike_orthogonal_to_top(w, factor))
    ctx = SubjectContext(info=None, model=model, config={}, baseline_config={},
                         baseline_files=weight_files(tiny_llama_dir), tokenizer_hashes=("", ""),
                         base_model_prefix=model.base_model_prefix)
    probe.subject_loaded(ctx, state)
    measured = {m["name"]: m for m in probe.measure(ctx, state)["modules"]}
    params = dict(model.named_parameters())
    for path in targets:
        # the matrix spectral measures: q_proj balanced with k_proj, norms folded (γ = 1)
        w = fold.effective(f"{path}.weight", lambda n: params[n].detach(),
                           state["transforms"]).double()
        record = measured[f"{path}.weight"]
        exact_change = float(torch.linalg.svdvals(w)[0]) / record["sigma_baseline"] - 1
        assert exact_change > (0.5 if factor > 1 else 0.05)
        measured_change = record["sigma_subject"] / record["sigma_baseline"] - 1
        assert measured_change == pytest.approx(exact_change, rel=1e-3), path
        assert (record["iterations"] == 0) == (exact_limit > 0)
        assert record["residual"] <= probe_module.RESIDUAL_TOL
        if path.endswith("gate_proj"):  # unpaired: the effective matrix is the weight
            assert record["edit_size"] == pytest.approx(factor, rel=1e-2)
        else:  # balanced with k_proj, which rescales the spike's rotary pairs
            assert record["edit_size"] > factor / 2


def test_top_singular_is_exact_below_the_limit_and_within_its_residual_beyond():
    import torch

    from invarlock.guards.measure.weights import RESIDUAL_TOL, single_thread, top_singular

    gen = torch.Generator().manual_seed(0)
    spike = torch.randn(300, 1, generator=gen) @ torch.randn(1, 500, generator=gen) * 0.2
    for w in (torch.randn(300, 500, generator=gen) + spike,
              torch.randn(300, 500, generator=gen)):  # no gap at the top of the MP bulk
        exact = float(torch.linalg.svdvals(w.double())[0])
        with single_thread():
            small = top_singular(w, exact_max_elements=w.numel())
            big = top_singular(w, seed=1, exact_max_elements=0)
            warm = top_singular(w * 1.001, big.vector, seed=2, exact_max_elements=0)
        assert small.exact and small.sigma == pytest.approx(exact, rel=1e-6)
        assert not big.exact and big.residual <= RESIDUAL_TOL
        assert big.sigma <= exact * (1 + 1e-6)  # a Ritz value never exceeds σ_max
        assert big.sigma == pytest.approx(exact, rel=RESIDUAL_TOL)
        assert warm.sigma == pytest.approx(1.001 * exact, rel=RESIDUAL_TOL)


def test_a_spike_orthogonal_to_the_warm_start_is_found_by_the_random_starts():
    import torch

    from invarlock.guards.measure.weights import power_iteration, top_singular

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=gen)
    v_b = torch.linalg.svd(w.double())[2][0].float()
    sigma_b = float(torch.linalg.svdvals(w.double())[0])
    spiked = _spike_orthogonal_to_top(w)
    exact = float(torch.linalg.svdvals(spiked.double())[0])
    stuck, _, _ = power_iteration(spiked, v_b)  # the warm start alone stays on v_b
    assert stuck / sigma_b - 1 < 1e-3 < exact / sigma_b - 1
    found = top_singular(spiked, v_b, seed=3, exact_max_elements=0)
    assert found.sigma == pytest.approx(exact, rel=1e-5)


def test_large_matrices_get_the_thread_pool_back_inside_a_single_thread_block():
    import torch

    from invarlock.guards.measure.weights import THREADED_MIN_ELEMENTS, single_thread, threads_for

    big = torch.empty(THREADED_MIN_ELEMENTS)
    small = torch.empty(THREADED_MIN_ELEMENTS - 1)
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            with threads_for(big):
                assert torch.get_num_threads() == 2
            with threads_for(small):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        with threads_for(big):  # outside a single-thread block: nothing to give back
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)


def test_spectral_probe_streams_baseline_weights_and_measures_changes(tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.spectral import SpectralProbe
    from invarlock.models.source import weight_files

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    probe = SpectralProbe({})
    probe.baseline_loaded(model)
    state = probe.baseline_state()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1.5)
    ctx = SubjectContext(info=None, model=model, config={}, baseline_config={},
                         baseline_files=weight_files(tiny_gpt2_dir), tokenizer_hashes=("", ""),
                         base_model_prefix=model.base_model_prefix)
    probe.subject_loaded(ctx, state)
    measured = {m["name"]: m for m in probe.measure(ctx, state)["modules"]}
    changed = measured["transformer.h.1.mlp.c_proj.weight"]
    assert changed["changed"] and changed["sigma_subject"] == pytest.approx(
        1.5 * changed["sigma_baseline"], rel=1e-5)
    assert changed["edit_size"] == pytest.approx(0.5, rel=1e-3)
    same = measured["transformer.h.0.attn.c_attn.weight"]
    assert not same["changed"] and same["sigma_subject"] == same["sigma_baseline"]
    assert "transformer.wte.weight" in measured and "lm_head.weight" not in measured  # tied


def test_robust_z_uses_the_modules_the_edit_touched():
    """A LoRA merge into q/v leaves o untouched: those zeros must not shrink the scale."""
    rng = np.random.default_rng(5)
    touched = list(rng.normal(0.0, 1e-3, 6))
    scores = spectral.score_modules(modules({"attn": touched + [0.0] * 6}), 0.5, ["attn"])
    assert max(abs(s.z) for s in scores) < 4.0
    assert all(s.z == 0.0 for s in scores if s.r == 0.0)
    # one blown-up matrix alone in its family is a violation (no reference to compare with)
    d = spectral.decide({"evaluated": True, "modules": modules({"attn": [2.0] + [0.0] * 11})},
                        POLICY)
    assert not d.passed and d.findings[0]["module"] == "layers.0.attn.weight"
