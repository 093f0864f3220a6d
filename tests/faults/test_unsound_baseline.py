"""A baseline with NaN weights is no reference: exit 3 with the message the README promises."""

from __future__ import annotations

from tests.faults.conftest import certify, error_lines


def test_baseline_with_nan_weights_stops_with_an_evidence_error(
        nan_baseline, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    code, payload, stderr = certify(nan_baseline, tiny_gpt2_dir, tmp_path / "o", sonnets_path,
                                    fast_preset)
    assert code == 3
    assert "internal error" not in payload["error"]
    assert "baseline" in payload["error"] and "non-finite" in payload["error"]
    assert len(error_lines(stderr)) == 1
    assert not (tmp_path / "o").exists()
