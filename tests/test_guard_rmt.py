"""RMT guard: outlier counts beyond the Marchenko–Pastur edge, the calibrated paired null
with family-wise control over the module tests, robustness to massive activations, and the
family/module rule."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from invarlock.guards import rmt

CALIBRATION = Path(__file__).resolve().parents[1] / "policies" / "calibration" / "demo"
POLICY = {"epsilon_by_family": {"attn": 0.05, "ffn": 0.05, "embed": 0.05, "other": 0.05},
          "null_tau": 0.5, "edge_band": 0.1, "false_alarm_rate": 0.01}


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
    # the Gram route resolves a singular value to about √(n·ε)·σ_max (centring leaves one
    # exactly 0, which comes out as rounding noise of order 1e-8)
    np.testing.assert_allclose(rmt.spectrum(y), expected, rtol=1e-8, atol=2e-7)
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


def _module_spectra(rng, modules, groups=4, rows=64, features=128):
    """Per module, `groups` stored spectra of Gaussian rows with 0–6 planted directions whose
    strengths straddle the edge (the values a benign edit can push across it)."""
    out = []
    for _ in range(modules):
        k = int(rng.integers(0, 7))
        u = rng.normal(size=(features, k)) / np.sqrt(features)
        strength = rng.uniform(0.0, 2.5, k)
        spectra = []
        for _ in range(groups):
            z = rng.normal(size=(rows, k)) * strength
            y = rng.normal(size=(rows, features)) + z @ u.T * np.sqrt(features)
            values = rmt.spectrum(y)
            spectra.append(values[values > 0.7])  # lower ones never reach the stored range
        out.append(spectra)
    return out


def _null_run(rng, spectra, scale=0.02, family="ffn", heavy=None):
    """A simulated benign edit: every normalised singular value moves by a small relative
    amount (a per-run strength, a shared drift and independent jitter), as a small change
    of the weights moves the spectrum of the outputs; what is stored is what the probe
    keeps (values above `KEEP_ABOVE`)."""
    strength = rng.uniform(0.25, 1.0)
    drift = rng.normal(0.0, scale / 4)
    mods = []
    for i, groups in enumerate(spectra):
        jitter = scale * strength * ((heavy or {}).get(i, 1.0))
        subject = [g * (1 + drift + rng.normal(0.0, jitter, g.size)) for g in groups]
        mods.append({"name": f"layers.{i}.mlp.up_proj", "family": family, "features": 128,
                     "rows": [64] * len(groups),
                     "baseline": [g[g > rmt.KEEP_ABOVE].tolist() for g in groups],
                     "subject": [np.sort(g[g > rmt.KEEP_ABOVE])[::-1].tolist()
                                 for g in subject]})
    return mods


def _old_rule_flags(mods, epsilon=0.05, null_z=3.0):
    """Whether the earlier rule (margin from the baseline's window-group spread) fails."""
    for m in mods:
        b, s = rmt.counts(m["baseline"]), rmt.counts(m["subject"])
        limit, _ = rmt.margin(b, epsilon, null_z)
        if abs(float(s.sum() - b.sum())) > limit:
            return True
    return False


def test_false_alarm_rate_over_many_module_tests_stays_at_the_target():
    """Calibrate τ on 20 simulated benign runs of 200 modules (`null_scale`, the largest
    run), then 300 fresh benign runs: the share of runs with any flag stays at or below the
    per-run target (Bonferroni over every module and family), where the earlier
    window-spread margin fails most runs; a module with three new outlier directions is
    still caught in every run."""
    rng = np.random.default_rng(7)
    spectra = _module_spectra(rng, 200)
    band = 0.1
    tau = max(rmt.null_scale(*rmt.null_inputs(_null_run(rng, spectra), band))
              for _ in range(20))
    target = 0.05
    policy = {**POLICY, "null_tau": tau, "edge_band": band, "false_alarm_rate": target}
    runs = 300
    healthy = rng.normal(size=(64, 128))
    damaged = healthy.copy()
    damaged[:, :3] *= 25.0  # three outlier features: blown-up rows of the weight
    victim = {"name": "layers.17.mlp.up_proj", "family": "ffn", "features": 128,
              "rows": [64] * 4,
              "baseline": [rmt.kept(rmt.spectrum(healthy[:, rng.permutation(128)]
                                                 + rng.normal(0, 0.05, (64, 128))))
                           for _ in range(4)],
              "subject": [rmt.kept(rmt.spectrum(damaged + rng.normal(0, 0.05, (64, 128))))
                          for _ in range(4)]}
    alarms = old_alarms = caught = 0
    for _ in range(runs):
        mods = _null_run(rng, spectra)
        alarms += not rmt.decide({"evaluated": True, "modules": mods}, policy).passed
        old_alarms += _old_rule_flags(mods)
        d = rmt.decide({"evaluated": True, "modules": [*mods[:17], victim, *mods[18:]]},
                       policy)
        caught += victim["name"] in [f["module"] for f in d.findings]
    assert alarms / runs <= target, (alarms, tau)
    assert old_alarms / runs > 0.5, old_alarms
    assert caught == runs


def test_one_module_that_every_benign_edit_moves_more_is_covered_by_the_calibrated_scale():
    """A benign edit can move one module far more than the rest (a massive-activation
    down-projection under pruning). τ from the mean-square bound alone averages it away and
    fails it in most fresh benign runs; the per-run scale that also covers every module
    (`rmt_null.run_scale`) keeps fresh benign runs passing, and a damaged module elsewhere
    is still caught in every run."""
    from invarlock.calibration import rmt_null

    rng = np.random.default_rng(11)
    spectra = _module_spectra(rng, 120)
    heavy = {5: 6.0}
    band = 0.1
    calibration = [rmt.null_inputs(_null_run(rng, spectra, heavy=heavy), band) for _ in range(20)]
    mean_square = max(rmt.null_scale(*run) for run in calibration)
    covering = max(rmt_null.run_scale(*run) for run in calibration)
    assert covering > mean_square
    healthy = rng.normal(size=(64, 128))
    damaged = healthy.copy()
    damaged[:, :3] *= 25.0
    victim = {"name": "layers.40.mlp.up_proj", "family": "ffn", "features": 128,
              "rows": [64] * 4,
              "baseline": [rmt.kept(rmt.spectrum(healthy + rng.normal(0, 0.05, (64, 128))))
                           for _ in range(4)],
              "subject": [rmt.kept(rmt.spectrum(damaged + rng.normal(0, 0.05, (64, 128))))
                          for _ in range(4)]}
    runs = 150
    alarms = {"mean_square": 0, "covering": 0}
    caught = 0
    for _ in range(runs):
        mods = _null_run(rng, spectra, heavy=heavy)
        for label, tau in (("mean_square", mean_square), ("covering", covering)):
            policy = {**POLICY, "null_tau": tau, "edge_band": band,
                      "false_alarm_rate": rmt_null.REFERENCE_RATE}
            alarms[label] += not rmt.decide({"evaluated": True, "modules": mods},
                                            policy).passed
        policy = {**POLICY, "null_tau": covering, "edge_band": band,
                  "false_alarm_rate": rmt_null.REFERENCE_RATE}
        d = rmt.decide({"evaluated": True, "modules": [*mods[:40], victim, *mods[41:]]}, policy)
        caught += victim["name"] in [f["module"] for f in d.findings]
    assert alarms["mean_square"] / runs >= 0.1, alarms  # the heavy module, run after run
    assert alarms["covering"] / runs <= 0.05, alarms
    assert caught == runs


def test_covering_scale_is_the_smallest_that_passes_every_module():
    moved, near = [9.0, 1.0, -2.0, 0.0], [37, 20, 40, 3]
    level = 0.01 / 4
    tau = rmt.covering_scale(moved, near, level)
    n = np.array(near, dtype=float) + 1.0
    assert np.all(np.abs(moved) <= rmt.null_margins(tau * tau * n, level))
    assert np.any(np.abs(moved) > rmt.null_margins((0.99 * tau) ** 2 * n, level))
    assert rmt.covering_scale([0.0, 0.0], [5, 9], level) == 0.0


def test_the_reference_rate_is_the_default_tiers():
    """τ is sized at the balanced tier's per-run false-alarm rate."""
    from invarlock.calibration import rmt_null
    from invarlock.policy import tiers as shipped_tiers

    assert shipped_tiers()["balanced"]["guards"]["rmt"]["false_alarm_rate"] == (
        rmt_null.REFERENCE_RATE)


def test_margin_grows_with_the_values_near_the_edge_and_the_number_of_tests():
    """A module with no value near the edge tolerates about one crossing; one with many
    tolerates more; more tests (a deeper model) widen every margin (Bonferroni)."""
    lonely = _module("layers.0.mlp.c_fc", "ffn", [3, 3, 3, 3], [3, 3, 3, 3])
    lonely["baseline"] = [[2.0] * 3 for _ in range(4)]
    lonely["subject"] = [[2.0] * 3 for _ in range(3)] + [[2.0] * 3 + [1.3, 1.4, 1.5]]
    d = rmt.decide({"evaluated": True, "modules": [lonely]}, POLICY)
    assert not d.passed and d.findings[0]["near_edge"] == 0  # three new directions far out
    crowded = dict(lonely, baseline=[[2.0] * 3 + [1.02, 0.98, 1.05, 0.95] for _ in range(4)],
                   subject=[[2.0] * 3 + [1.02, 0.98, 1.05, 0.95] for _ in range(3)] +
                   [[2.0] * 3 + [1.03, 1.01, 1.05, 0.95]])
    assert rmt.decide({"evaluated": True, "modules": [crowded]}, POLICY).passed
    more_tests = [dict(crowded, name=f"layers.{i}.mlp.c_fc") for i in range(400)]
    assert rmt.decide({"evaluated": True, "modules": more_tests}, POLICY).summary["tests"] == 401
    wide = rmt.null_margins([2.0], 0.01 / 401)[0]
    assert wide > rmt.null_margins([2.0], 0.01 / 2)[0] > rmt.null_margins([0.5], 0.01 / 2)[0]
    with pytest.raises(ValueError, match="false_alarm_rate"):
        rmt.decide({"evaluated": True, "modules": [crowded]}, {**POLICY, "false_alarm_rate": 1.5})


def test_counts_within_the_null_margin_pass_and_the_spread_is_recorded():
    mods = [_module(f"layers.{i}.mlp.c_fc", "ffn", [4, 5, 4, 5], [4, 5, 5, 5])
            for i in range(6)]
    d = rmt.decide({"evaluated": True, "windows": 16, "modules": mods}, POLICY)
    fam = d.summary["families"]["ffn"]
    assert d.passed and fam["excess"] == 6 and fam["baseline_by_group"] == [24, 30, 24, 30]
    # 8 values at 0.9 (within the band) per module: spread τ·√(6·9)
    assert fam["null_spread"] == pytest.approx(0.5 * np.sqrt(6 * 9))
    assert d.summary["tests"] == 7 and d.summary["closest_module"]["excess"] == 1


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


def test_a_policy_without_the_calibrated_null_is_not_a_pass():
    """A certificate whose policy predates `null_tau` cannot be decided again as a pass."""
    mods = [_module("layers.0.mlp.c_fc", "ffn", [3, 3, 3, 3], [3, 3, 3, 3])]
    old = {k: v for k, v in POLICY.items() if k != "null_tau"}
    d = rmt.decide({"evaluated": True, "modules": mods}, {**old, "null_z": 3.0})
    assert not d.passed and "null_tau" in d.reason


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


def test_shipped_null_tau_recomputes_from_the_committed_benign_runs():
    """Every benign zoo run's null scale is recomputed from its committed per-module inputs
    (excess, values near the edge); every tier's `null_tau` covers the largest of them
    rounded up to 0.01 (SmolLM2's 10% pruning sets the shipped value, recomputed in
    tests/test_calibrate.py), and under the demo's own τ every benign run passed, 4-bit RTN
    per group of 128 using at most half of any module's margin. Changing a module row or a
    run's value fails here."""
    with (CALIBRATION / "zoo-rmt-runs.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    with (CALIBRATION / "zoo-rmt-null-modules.csv").open() as fh:
        modules = list(csv.DictReader(fh))
    from invarlock.calibration import rmt_null

    benign = [r for r in runs if r["kind"] == "benign"]
    null = rmt_null.null_tau([{**m, "run": f"{m['family']}:{m['seed']}"} for m in modules])
    assert set(null.per_run) == {f"{r['family']}:{r['seed']}" for r in benign}
    for r in benign:
        tau = null.per_run[f"{r['family']}:{r['seed']}"]
        assert tau == pytest.approx(float(r["rmt_null_scale"]), rel=1e-9, abs=1e-12), r
    expected = math.ceil(max(null.per_run.values()) * 100) / 100
    assert null.tau == pytest.approx(expected) and null.run == "rtn4_group:0"
    tiers = yaml.safe_load((CALIBRATION.parents[1] / "tiers.yaml").read_text())
    for tier in ("balanced", "conservative", "aggressive"):
        assert tiers[tier]["guards"]["rmt"]["null_tau"] >= expected, tier
    assert all(r["rmt"] == "True" for r in benign)
    rtn4 = [float(r["rmt_closest_share"]) for r in benign if r["family"] == "rtn4_group"]
    assert rtn4 and max(rtn4) <= 0.5
