"""Classifier edge cases end to end on tiny sequence classifiers: a baseline that gets every
example wrong, and a subject whose logits are not finite (NaN correctness values). Each must
give the right verdict for the right reason, and a certificate that verifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from invarlock import gate
from invarlock.certificate import document
from invarlock.cli import main
from invarlock.enums import MetricKind
from invarlock.policy import PrimaryMetricPolicy
from invarlock.verify import verify_certificate
from tests.tinymodels import SONNETS

FAST = "dataset: {seq_len: 32, preview_n: 16, final_n: 16}\neval: {bootstrap: {replicates: 200}}\n"
POLICY = PrimaryMetricPolicy(1.10, -1.0, 2.0, (0.95, 1.05))


def _with_head(src: Path, dst: Path, *, bias: tuple[float, float]) -> Path:
    """A copy of the tiny classifier whose head is biased toward one class (or is NaN)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(src)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def all_ones(tmp_path_factory) -> Path:
    """Sonnet lines all labelled 1."""
    lines = [ln.strip() for ln in SONNETS.read_text().splitlines() if len(ln.strip()) > 20]
    path = tmp_path_factory.mktemp("ones") / "ones.jsonl"
    path.write_text("".join(json.dumps({"text": ln, "label": 1}) + "\n" for ln in lines[:80]))
    return path


@pytest.fixture(scope="module")
def zero_baseline(tiny_classifier_dir, tmp_path_factory) -> Path:
    """Always answers class 0, so it gets every all-ones example wrong."""
    return _with_head(tiny_classifier_dir, tmp_path_factory.mktemp("zero") / "m",
                      bias=(50.0, -50.0))


def _certify(tmp_path: Path, *args: str, preset_text: str = FAST) -> tuple[int, dict, dict]:
    preset = tmp_path / "fast.yaml"
    preset.write_text(preset_text)
    result = CliRunner().invoke(main, ["certify", *args, "--profile", "dev", "--preset",
                                       str(preset), "--no-cache", "--json", "--out",
                                       str(tmp_path / "o")], catch_exceptions=False)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    cert = document.load_certificate(tmp_path / "o") if "certificate" in summary else {}
    return result.exit_code, summary, cert


def _reasons(cert: dict) -> str:
    return " | ".join(cert["verdict"]["explanations"].values())


def test_zero_accuracy_baseline_against_a_subject_that_is_right_passes(
        zero_baseline, all_ones, tmp_path):
    """The metric's edge case: the subject is right where the baseline is always wrong. Its
    head bias is flipped, an edit the rows guard rightly sees (recorded here, not gating),
    so the verdict rests on the metric checks this test is about."""
    subject = _with_head(zero_baseline, tmp_path / "right", bias=(-50.0, 50.0))
    code, summary, cert = _certify(tmp_path, "--baseline", str(zero_baseline), "--subject",
                                   str(subject), "--dataset", str(all_ones),
                                   preset_text=FAST + "guards: {rows: {mode: monitor}}\n")
    assert cert["validation"]["rows_stable"] is False and "classifier.bias" in _reasons(cert)
    pm = cert["primary_metric"]
    assert pm["preview"]["baseline"] == 0.0 and pm["final"]["baseline"] == 0.0
    assert pm["final"]["subject"] == 1.0 and pm["ratio"] is None  # undefined, not an error
    assert pm["delta"]["estimate"] == 100.0 and not pm["catastrophic"]
    assert cert["validation"]["not_catastrophic"] is True
    assert "non-finite" not in _reasons(cert)
    assert "baseline's accuracy is 0" in cert["verdict"]["explanations"][
        "preview_final_drift_acceptable"]
    assert code == 0 and summary["verdict"] == "PASS"
    assert verify_certificate(cert).differences == ()


def test_zero_accuracy_baseline_against_an_equally_wrong_subject_passes(
        zero_baseline, all_ones, tmp_path):
    code, summary, cert = _certify(tmp_path, "--baseline", str(zero_baseline), "--edit",
                                   "quant_rtn", "--dataset", str(all_ones))
    pm = cert["primary_metric"]
    assert pm["final"] == {"baseline": 0.0, "subject": 0.0, "ratio": 1.0}
    assert pm["delta"]["ci"] == [0.0, 0.0]
    assert code == 0 and summary["verdict"] == "PASS", cert["verdict"]
    assert verify_certificate(cert).differences == ()


def test_non_finite_logits_give_nan_correctness_and_fail_as_non_finite(
        tiny_classifier_dir, labelled_jsonl, tmp_path):
    broken = _with_head(tiny_classifier_dir, tmp_path / "broken", bias=(float("nan"), 0.0))
    code, summary, cert = _certify(tmp_path, "--baseline", str(tiny_classifier_dir),
                                   "--subject", str(broken), "--dataset", str(labelled_jsonl))
    assert code == 1 and summary["verdict"] == "FAIL"
    assert cert["primary_metric"]["catastrophic"] and cert["primary_metric"]["final"] is None
    assert cert["validation"]["not_catastrophic"] is False
    explanation = cert["verdict"]["explanations"]["not_catastrophic"]
    assert explanation == "subject produced non-finite outputs (NaN correctness) on preview"
    assert None in cert["windows"]["preview"]["subject"]  # NaN stored as null, valid JSON
    assert verify_certificate(cert).differences == ()


def test_a_broken_baseline_is_an_evidence_error(tiny_classifier_dir, labelled_jsonl, tmp_path):
    broken = _with_head(tiny_classifier_dir, tmp_path / "broken", bias=(float("nan"), 0.0))
    code, summary, _ = _certify(tmp_path, "--baseline", str(broken), "--subject",
                                str(tiny_classifier_dir), "--dataset", str(labelled_jsonl))
    assert code == 3 and "the baseline has non-finite" in summary["error"]
    assert "nothing sound to compare" in summary["error"]


# --- the same rules on plain arrays ---------------------------------------------------------

def _acc(base, subj) -> gate.PairedArrays:
    base = np.asarray(base, dtype=float)
    return gate.PairedArrays(np.ones(base.size, dtype=np.int64), base,
                             np.asarray(subj, dtype=float))


@pytest.mark.parametrize("subject", [np.zeros(40), np.ones(40), np.r_[np.ones(10), np.zeros(30)]])
def test_a_baseline_that_scored_zero_is_never_catastrophic(subject):
    boot = gate.BootstrapPolicy(200, 0.05, 0)
    arrays = _acc(np.zeros(40), subject)
    result = gate.primary_metric(MetricKind.ACCURACY, arrays, arrays, POLICY, boot)
    checks = {c.flag: c for c in gate.primary_checks(result, POLICY)}
    assert not result.catastrophic and checks["not_catastrophic"].passed
    assert checks["primary_metric_acceptable"].passed  # nothing can be lost from zero
    assert checks["preview_final_drift_acceptable"].passed


def test_nan_correctness_on_preview_stops_the_run_with_that_reason():
    boot = gate.BootstrapPolicy(200, 0.05, 0)
    preview = _acc(np.ones(20), np.r_[np.ones(19), np.nan])
    result = gate.primary_metric(MetricKind.ACCURACY, preview, None, POLICY, boot)
    assert result.catastrophic and result.preview.subject is None
    check = gate.primary_checks(result, POLICY)[0]
    assert not check.passed and "non-finite outputs" in check.reason
    json.dumps(result.as_dict(), allow_nan=False)  # the certificate section stays valid JSON


def test_accuracy_halved_is_catastrophic_and_says_so():
    boot = gate.BootstrapPolicy(200, 0.05, 0)
    preview = _acc(np.ones(20), np.r_[np.ones(9), np.zeros(11)])
    result = gate.primary_metric(MetricKind.ACCURACY, preview, None, POLICY, boot)
    check = gate.primary_checks(result, POLICY)[0]
    assert result.catastrophic and check.reason == "preview accuracy ratio 0.450 < 0.50"
