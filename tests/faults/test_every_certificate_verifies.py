"""Every certificate `certify` writes verifies as authentic, whatever the subject was, and the
headline says what happened."""

from __future__ import annotations

import pytest

from tests.faults.conftest import certify, invoke

CASES = ["other depth", "other width", "bigger vocabulary", "smaller vocabulary", "NaN weight",
         "tokenizer changed"]


@pytest.fixture(scope="module")
def runs(broken_subjects, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path_factory):
    """certify each broken subject once: name -> (exit code, summary, stderr, out dir)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in CASES:
        folder = root / name.replace(" ", "-")
        code, summary, stderr = certify(tiny_gpt2_dir, broken_subjects[name], folder,
                                        sonnets_path, fast_preset)
        out[name] = (code, summary, stderr, folder)
    return out


@pytest.mark.parametrize("name", CASES)
def test_certificate_of_a_broken_subject_verifies_as_authentic(runs, name):
    code, summary, _stderr, folder = runs[name]
    assert code in (1, 3), (code, summary)
    if code == 3:  # evidence could not be produced: nothing was certified
        assert not (folder / "evaluation.cert.json").exists()
        return
    v_code, report, _ = invoke("verify", str(folder), "--json")
    assert v_code == 1, report["certificates"][0]["differences"]
    assert report["certificates"][0]["verified"] is True


@pytest.mark.parametrize("name", ["bigger vocabulary", "smaller vocabulary"])
def test_subject_with_another_vocabulary_fails_on_the_invariants(runs, name):
    code, summary, _stderr, folder = runs[name]
    assert code == 1 and summary["verdict"] == "FAIL"
    assert summary["guards"]["invariants"]["passed"] is False
    assert (folder / "evaluation.cert.json").exists()
    assert "tokenizer" not in " ".join(summary["reasons"]).lower()
    assert summary["stopped"] == "invariants failed before evaluation"


def test_shape_change_is_reported_as_stopped_not_catastrophic(runs):
    code, summary, _, folder = runs["other depth"]
    assert code == 1
    assert summary["catastrophic"] is False
    assert summary["stopped"] == "invariants failed before evaluation"
    from invarlock.certificate.document import load_certificate
    from invarlock.certify import CertifyOutcome
    from invarlock.cli import _human_summary

    cert = load_certificate(folder)
    text = _human_summary(CertifyOutcome(cert, folder / "evaluation.cert.json",
                                         folder / "evaluation.cert.md").summary())
    assert "catastrophic" not in text
    assert "stopped: invariants failed before evaluation" in text
    assert "spectral not measured" in text and "spectral FAILED" not in text
    page = (folder / "evaluation.cert.md").read_text()
    assert "**Stopped**: the invariants guard failed before evaluation" in page
    assert "Catastrophic" not in page


def test_html_report_of_a_stopped_run_says_it_verifies(runs):
    _, _, _, folder = runs["other width"]
    page = (folder / "evaluation.report.html").read_text()
    assert "does not verify" not in page.lower()
