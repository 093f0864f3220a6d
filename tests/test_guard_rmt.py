"""RMT guard: edge risk against Marchenko–Pastur, standardisation, and the family rule."""

from __future__ import annotations

import numpy as np
import pytest

from invarlock.guards import rmt

POLICY = {"epsilon_by_family": {"attn": 0.05, "ffn": 0.05, "embed": 0.1, "other": 0.1}}


def test_gaussian_noise_sits_at_the_marchenko_pastur_edge():
    rng = np.random.default_rng(0)
    for m, n in ((128, 512), (256, 256), (512, 96)):
        e = rmt.edge_risk(rng.normal(3.0, 7.0, (m, n)))  # offset and scale do not matter
        assert e == pytest.approx(1.0, abs=0.06)


def test_edge_risk_matches_exact_singular_value():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(64, 200)) @ np.diag(rng.uniform(0.5, 3.0, 200))
    yc = y - y.mean(axis=0)
    scale = np.sqrt(np.median((yc**2).mean(axis=0)))
    expected = np.linalg.svd(yc, compute_uv=False)[0] / scale / (8 + np.sqrt(200))
    assert rmt.edge_risk(y) == pytest.approx(expected, rel=1e-5)
    assert rmt.edge_risk(y.T) == pytest.approx(rmt.edge_risk(y.T.copy()), rel=1e-12)
    assert rmt.edge_risk(3.0 * y) == pytest.approx(rmt.edge_risk(y), rel=1e-5)  # scale-free


def test_outlier_features_raise_edge_risk_and_per_column_scaling_would_hide_them():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(128, 256))
    damaged = y.copy()
    damaged[:, :3] *= 40.0  # three outlier features (blown-up rows of the weight)
    assert rmt.edge_risk(damaged) > 3 * rmt.edge_risk(y)
    # A correlation-style standardisation (each column to unit variance) erases them:
    per_column = lambda a: (a - a.mean(0)) / a.std(0)  # noqa: E731
    assert rmt.edge_risk(per_column(damaged)) == pytest.approx(
        rmt.edge_risk(per_column(y)), rel=1e-6)


def test_outliers_show_even_when_the_baseline_has_a_dominant_direction():
    # Trained activations often share one strong direction; with an RMS scale, new outlier
    # features inflate the scale and the edge risk falls; the median feature scale keeps them.
    rng = np.random.default_rng(3)
    shared = rng.normal(size=(128, 1)) @ rng.normal(size=(1, 128))
    y = shared + rng.normal(size=(128, 128))
    damaged = y.copy()
    damaged[:, [3, 17, 42]] = rng.normal(size=(128, 3)) * 25.0

    def rms_scaled(a: np.ndarray) -> float:
        ac = a - a.mean(0)
        return np.linalg.svd(ac, compute_uv=False)[0] / np.sqrt((ac**2).mean()) / 2 / np.sqrt(128)

    assert rms_scaled(damaged) < rms_scaled(y)
    assert rmt.edge_risk(damaged) > 2 * rmt.edge_risk(y)


def test_degenerate_inputs():
    assert rmt.edge_risk(np.ones((10, 10))) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        rmt.edge_risk(np.ones(10))
    with pytest.raises(ValueError, match="inconsistent"):
        rmt.edge_risk_from_gram(np.eye(3), np.ones(4), 3, 5)


def _modules(base: dict[str, list[float]], subj: dict[str, list[float]]) -> list[dict]:
    return [{"name": f"h.{i}.{fam}", "family": fam, "baseline": b, "subject": s}
            for fam in base for i, (b, s) in enumerate(zip(base[fam], subj[fam], strict=True))]


def test_every_module_within_epsilon_is_stable():
    mods = _modules({"attn": [1.2, 2.0], "ffn": [3.0, 1.1]},
                    {"attn": [1.25, 2.09], "ffn": [3.1, 1.0]})
    d = rmt.decide({"modules": mods, "windows": 8}, POLICY)
    assert d.passed and not d.findings
    assert d.summary["families"]["attn"]["max_growth"] == pytest.approx(2.09 / 2.0)
    assert d.summary["families"]["attn"]["module"] == "h.1.attn"


def test_growth_of_one_module_is_not_masked_by_a_larger_neighbour():
    # ffn's largest edge risk stays 3.0 (h.0), but h.1 grew ×1.8: unstable
    mods = _modules({"attn": [1.2, 2.0], "ffn": [3.0, 1.1]},
                    {"attn": [1.2, 2.0], "ffn": [3.0, 2.0]})
    d = rmt.decide({"modules": mods, "windows": 8}, POLICY)
    assert not d.passed and "ffn" in d.reason
    assert [f["module"] for f in d.findings] == ["h.1.ffn"]
    relaxed = {"epsilon_by_family": {**POLICY["epsilon_by_family"], "ffn": 0.9}}
    assert rmt.decide({"modules": mods}, relaxed).passed


def test_growth_from_zero():
    assert rmt.growth(0.0, 0.0) == 1.0 and rmt.growth(0.0, 1.0) == float("inf")
    mods = _modules({"ffn": [0.0]}, {"ffn": [2.0]})
    d = rmt.decide({"modules": mods}, POLICY)
    assert not d.passed and d.summary["families"]["ffn"]["max_growth"] is None
