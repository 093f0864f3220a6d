"""RMT guard: outlier counts beyond the Marchenko–Pastur edge, the baseline's null spread,
robustness to massive activations, and the family/module rule."""

from __future__ import annotations

import numpy as np
import pytest

from invarlock.guards import rmt

POLICY = {"epsilon_by_family": {"attn": 0.05, "ffn": 0.05, "embed": 0.05, "other": 0.05},
          "null_z": 3.0}


def test_gaussian_noise_has_no_outliers_beyond_the_edge():
    rng = np.random.default_rng(0)
    for m, n in ((64, 512), (128, 128), (512, 96)):
        values = rmt.spectrum(rng.normal(3.0, 7.0, (m, n)))  # offset and scale do not matter
        assert values[0] == pytest.approx(1.0, abs=0.08)
        assert rmt.outliers(rmt.kept(values)) <= 1


def test_spectrum_matches_exact_singular_values():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(64, 200)) @ np.diag(rng.uniform(0.5, 3.0, 200))
    yc = y - y.mean(axis=0)
    scale = np.sqrt(np.median((yc**2).mean(axis=0)))
    expected = np.linalg.svd(yc, compute_uv=False) / scale / (8 + np.sqrt(200))
    np.testing.assert_allclose(rmt.spectrum(y), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(rmt.spectrum(3.0 * y), rmt.spectrum(y), rtol=1e-8, atol=1e-6)


def test_outlier_features_add_outliers_and_per_column_scaling_would_hide_them():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(64, 256))
    damaged = y.copy()
    damaged[:, :3] *= 25.0  # three outlier features (blown-up rows of the weight)
    assert rmt.outliers(rmt.kept(rmt.spectrum(y))) <= 1  # noise: at most an edge fluctuation
    values = rmt.spectrum(damaged)
    assert rmt.outliers(rmt.kept(values)) >= 3 and values[2] > 5.0
    per_column = lambda a: (a - a.mean(0)) / a.std(0)  # noqa: E731
    assert rmt.spectrum(per_column(damaged))[0] < 1.2


def test_a_massive_activation_moving_does_not_move_the_count():
    """One token with a huge value in one feature (a massive activation) is one outlier
    however large it is; tripling it tripled the old edge ratio, not the count."""
    rng = np.random.default_rng(3)
    y = rng.normal(size=(64, 256))
    y[5, 17] = 400.0
    tripled = y.copy()
    tripled[5, 17] = 1200.0
    a, b = rmt.spectrum(y), rmt.spectrum(tripled)
    assert b[0] > 2.5 * a[0]
    assert rmt.outliers(rmt.kept(a)) == rmt.outliers(rmt.kept(b)) == 1


def _module(name, family, base, subject):
    return {"name": name, "family": family, "features": 64, "rows": [16] * len(base),
            "baseline": [[2.0] * c + [0.9] for c in base],
            "subject": [[2.0] * c + [0.9] for c in subject]}


def test_margin_comes_from_the_baseline_spread_across_window_groups():
    limit, spread = rmt.margin(np.array([10, 12, 10, 12]), 0.05, 3.0)
    assert spread == pytest.approx(np.std([10, 12, 10, 12], ddof=1))
    assert limit == pytest.approx(0.05 * 44 + 3.0 * spread * 2 + 1)
    flat, zero = rmt.margin(np.array([5, 5, 5, 5]), 0.0, 3.0)
    assert zero == 0.0 and flat == 1.0  # one new outlier is tolerated, two are not


def test_counts_within_the_null_margin_pass_and_the_spread_is_recorded():
    mods = [_module(f"layers.{i}.mlp.c_fc", "ffn", [4, 5, 4, 5], [4, 5, 5, 5])
            for i in range(6)]
    d = rmt.decide({"evaluated": True, "windows": 16, "modules": mods}, POLICY)
    fam = d.summary["families"]["ffn"]
    assert d.passed and fam["excess"] == 6 and fam["baseline_by_group"] == [24, 30, 24, 30]
    assert fam["null_spread"] == pytest.approx(np.std([24, 30, 24, 30], ddof=1))


def test_new_outliers_in_one_module_fail_even_when_the_family_sum_hides_them():
    mods = [_module(f"layers.{i}.mlp.c_fc", "ffn", [20, 30, 20, 30], [20, 30, 20, 30])
            for i in range(8)]
    mods.append(_module("layers.8.mlp.c_fc", "ffn", [2, 2, 2, 2], [6, 6, 6, 6]))
    d = rmt.decide({"evaluated": True, "modules": mods}, POLICY)
    fam = d.summary["families"]["ffn"]
    assert fam["excess"] == 16 and fam["excess"] < fam["margin"]  # diluted in the family
    assert not d.passed and [f["module"] for f in d.findings] == ["layers.8.mlp.c_fc"]


def test_non_finite_activations_count_as_outliers_and_fail():
    bad = _module("layers.0.attn.c_attn", "attn", [3, 3, 3, 3], [3, 3, 3, 3])
    bad["subject"] = [[None] * 8 for _ in range(4)]
    d = rmt.decide({"evaluated": True, "modules": [bad]}, POLICY)
    assert not d.passed


def test_nothing_matched_is_not_a_pass():
    d = rmt.decide({"evaluated": True, "modules": [], "unmatched": ["a"]}, POLICY)
    assert not d.passed and d.reason.startswith("not measured: no module matched")


def test_degenerate_inputs():
    assert rmt.spectrum(np.ones((10, 10))).size == 0
    with pytest.raises(ValueError):
        rmt.spectrum(np.ones(10))
    with pytest.raises(ValueError):
        rmt.normalized_spectrum(np.eye(3), np.ones(4), 3, 5)
    assert rmt.normalized_spectrum(np.full((3, 3), np.nan), np.ones(5), 3, 5)[0] == np.inf


def test_lost_outliers_are_a_change_too():
    """A block whose output lost its structure (drowned by damage upstream) fails as well."""
    mods = [_module(f"layers.{i}.mlp.c_fc", "ffn", [6, 6, 7, 6], [1, 1, 1, 1]) for i in range(4)]
    d = rmt.decide({"evaluated": True, "modules": mods}, POLICY)
    assert not d.passed and d.summary["families"]["ffn"]["excess"] == -4 * (25 - 4)


def test_row_tap_reduces_each_group_as_it_completes_whatever_the_batches():
    """Rows are dropped group by group as soon as a group's windows are all in (never more
    than one group waiting per module), and the result does not depend on the batching."""
    import torch

    from invarlock.evaluate import TapContext
    from invarlock.guards.measure.rmt import RowTap

    class Clock:
        seconds = 0.0

    groups = [[10, 11], [12, 13], [14, 15]]
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(6, 9, 12, generator=gen)  # windows 10..15, 9 positions, 12 features
    mask = torch.ones(6, 9, dtype=torch.int64)

    def observe_in(batches):
        tap = RowTap([("layers.0.mlp.up_proj", None)], groups, 4, 7, Clock())
        waiting = []
        lo = 0
        for size in batches:
            ids = np.arange(10 + lo, 10 + lo + size)
            tap.observe("layers.0.mlp.up_proj", outputs[lo:lo + size],
                        TapContext(ids, mask[lo:lo + size]))
            waiting.append(sum(sum(len(r) for r in rows) for rows in tap._buffers.values()))
            lo += size
        return tap.complete(), waiting

    whole, _ = observe_in([6])
    for batches in ([1, 1, 1, 1, 1, 1], [3, 3], [1, 4, 1]):
        result, waiting = observe_in(batches)
        assert result == whole
        assert max(waiting) <= 2 * 4  # at most one group (2 windows x 4 rows) held back
    assert whole["layers.0.mlp.up_proj"]["rows"] == [8, 8, 8]
