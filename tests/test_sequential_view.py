"""The sequential facts every rendering shows, read from certificates built the way certify
builds them (tests/certs.py runs the real design over synthetic differences)."""

from __future__ import annotations

import copy

import pytest

from invarlock.certificate import markdown
from invarlock.certificate import sequential_view as sv
from invarlock.enums import MetricKind
from invarlock.verify import verify_certificate
from tests.certs import synthetic_certificate


@pytest.fixture(scope="module")
def certs() -> dict[str, dict]:
    return {"pass": synthetic_certificate(shift=0.0, n=200, seed=11, sequential=True),
            "fail": synthetic_certificate(shift=0.2, n=200, seed=12, sequential=True),
            "max": synthetic_certificate(shift=0.0953, n=64, seed=7, sequential=True)}


def test_the_synthetic_sequential_certificates_verify(certs):
    for cert in certs.values():
        report = verify_certificate(cert)
        assert report.differences == () and "sequential" in report.checked


def test_a_clear_pass_is_decided_at_the_first_look(certs):
    view = sv.view(certs["pass"])
    assert view is not None
    assert (view.evaluated, view.maximum, view.decision, view.early) == (32, 200, "pass", True)
    assert view.phrase == "decided after 32 of 200 windows (PASS)"
    assert view.windows == "32/200"
    assert [look.windows for look in view.looks] == [32]
    assert view.deciding is view.looks[-1]
    assert view.why.startswith("At look 1 (32 windows) the upper bound +0.0")
    assert "below ln 1.10 = +0.095310" in view.why
    assert len(certs["pass"]["windows"]["final"]["subject"]) == 32


def test_a_clear_fail_says_which_bound_crossed(certs):
    view = sv.view(certs["fail"])
    assert view.phrase == "decided after 32 of 200 windows (FAIL)"
    assert "the lower bound +0.1" in view.why and "was above ln 1.10" in view.why
    assert certs["fail"]["verdict"]["status"] == "FAIL"


def test_a_borderline_run_goes_to_the_maximum_and_the_fixed_interval_decides(certs):
    view = sv.view(certs["max"])
    assert (view.evaluated, view.decision, view.early, view.deciding) == (64, "continue",
                                                                          False, None)
    assert view.phrase == ("ran to the maximum of 64 windows undecided; the fixed-design "
                           "interval decided")
    assert [look.windows for look in view.looks] == [32, 40, 48, 56, 64] == list(view.planned)
    assert "fixed-design interval at α = 0.04 decided on all 64 windows" in view.why


def test_accuracy_states_its_limit_in_percentage_points():
    cert = synthetic_certificate(kind=MetricKind.ACCURACY, n=96, seed=4, sequential=True)
    view = sv.view(cert)
    assert view.accuracy and view.limit_text == "the accuracy limit -1.00 pp"


def test_no_section_and_a_malformed_section_give_no_view(certs):
    assert sv.view(synthetic_certificate(seed=1)) is None
    for damage in (lambda s: s.__setitem__("stopped_at", "32"),
                   lambda s: s.__setitem__("decision", "<b>pass</b>"),
                   lambda s: s["looks"][0].__setitem__("high", float("nan")),
                   lambda s: s["design"].pop("n_max")):
        cert = copy.deepcopy(certs["pass"])
        damage(cert["sequential"])
        assert sv.view(cert) is None
        assert markdown.decided_phrase(cert) is None and markdown.sequential_section(cert) == []


def test_the_phrase_for_each_ending():
    assert sv.phrase(48, 200, "fail") == "decided after 48 of 200 windows (FAIL)"
    assert sv.phrase(40, 200, "nonfinite") == ("stopped after 40 of 200 windows on non-finite "
                                               "outputs")


def test_the_markdown_section_lists_the_looks_and_why(certs):
    text = markdown.render(certs["max"])
    section = text[text.index("## Sequential test"):]
    assert "ran to the maximum of 64 windows undecided" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "|---" not in line]
    assert [r.split("|")[2].strip() for r in rows[1:6]] == ["32", "40", "48", "56", "64"]
    assert "No look decided" in section
    headline = markdown.render(certs["pass"]).splitlines()[2]
    assert "Sequential test: decided after 32 of 200 windows \\(PASS\\)." in headline


def test_verify_states_the_recomputed_decision(certs):
    notes = {name: verify_certificate(cert).notes for name, cert in certs.items()}
    assert ("sequential test decided after 32 of 200 windows (PASS); 1 look(s) recomputed "
            "from the stored differences") in notes["pass"]
    assert any(n.startswith("sequential test decided after 32 of 200 windows (FAIL)")
               for n in notes["fail"])
    assert any(n.startswith("sequential test ran to the maximum of 64 windows undecided")
               and "5 look(s)" in n for n in notes["max"])


def test_the_verify_command_prints_the_decision(certs, tmp_path):
    import json

    from click.testing import CliRunner

    from invarlock.cli import main

    path = tmp_path / "evaluation.cert.json"
    path.write_text(json.dumps(certs["fail"]), encoding="utf-8")
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1, result.output  # verified, verdict FAIL
    assert "  note: sequential test decided after 32 of 200 windows (FAIL); 1 look(s)" in (
        result.output)
