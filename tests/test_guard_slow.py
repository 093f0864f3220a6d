"""Guards on a real pretrained model and over many seeds (slow: `make test-slow`)."""

from __future__ import annotations

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


def test_benign_zoo_passes_the_guards_and_harmful_zoo_fails(tmp_path):
    """Every benign zoo family (seeds 100-101, not used for calibration) passes every guard
    on the demo model, but the 50% pruning families, which are damage on a model not
    fine-tuned after them (`UNCALIBRATED`, failed by the primary metric too); every harmful
    family fails the verdict, except 4-bit RTN, which moves the demo's perplexity by 1.1%
    only (policies/CALIBRATION.md)."""
    baseline = kit.demo_dir()
    if baseline is None:
        pytest.skip("the bundled demo model is not installed")
    from invarlock.calibration.zoo_run import (
        BENIGN,
        GUARDS,
        HARMFUL,
        UNCALIBRATED,
        certify_zoo,
    )
    from invarlock.run_config import config_from_certify_flags, request_from_config

    preset = tmp_path / "windows.yaml"
    preset.write_text("dataset: {preview_n: 24, final_n: 24}\n")
    config = config_from_certify_flags({"baseline": "demo", "tier": "balanced",
                                        "profile": "dev", "presets": (preset,),
                                        "edit_name": "quant_rtn"})
    base = request_from_config(config)
    benign = certify_zoo(base, config, [f for f in BENIGN if f not in UNCALIBRATED], 2,
                         tmp_path, first_seed=100)
    alarms = [(r["family"], r["seed"], g) for r in benign for g in GUARDS if r[g] is False]
    assert not alarms
    harmful = certify_zoo(base, config, [f for f in HARMFUL if f != "rtn4"], 1, tmp_path,
                          first_seed=100)
    assert all(r["verdict"] == "FAIL" for r in harmful), [
        (r["family"], r["failing"]) for r in harmful if r["verdict"] != "FAIL"]
