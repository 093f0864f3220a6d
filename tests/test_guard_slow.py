"""Guards on a real pretrained model and over many seeds (slow: `make test-slow`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import guardkit as kit

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SONNETS = ROOT / "tests" / "data" / "sonnets.txt"


def _dataset() -> str:
    return "demo" if kit.demo_dir() else str(SONNETS)


def test_smollm2_int8_rtn_raises_no_spectral_or_rmt_alarm(tmp_path):
    model = kit.smollm2_dir()
    if model is None:
        pytest.skip("SmolLM2-135M not prepared (make smollm2)")
    code, summary, cert = kit.certify("--baseline", str(model), "--edit", "quant_rtn",
                                      "--dataset", _dataset(), "--profile", "dev", "--out",
                                      str(tmp_path), threads=True)
    assert cert["validation"]["spectral_stable"] is True
    assert cert["validation"]["rmt_stable"] is True
    assert cert["validation"]["invariants_pass"] is True
    assert code == 0 and summary["verdict"] == "PASS"


def test_twenty_benign_noise_seeds_give_at_most_one_balanced_fail(tmp_path):
    baseline = kit.demo_dir()
    if baseline is None:
        pytest.skip("the bundled demo model is not installed")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from false_alarm_rate import certify_noise_seeds
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    # seeds 100-119: not among the seeds the shipped thresholds were calibrated on (0-9)
    results = certify_noise_seeds("demo", None, 20, tier="balanced", profile="dev",
                                  presets=(), out=tmp_path, first_seed=100)
    fails = [r for r in results if r["verdict"] == "FAIL"]
    assert len(results) == 20 and len(fails) <= 1, fails
