"""invarlock.github.origin: the reference table (where the baseline, dataset, policy and
presets came from, their digests, whether the pull request changed them) appears in every
report — comment, check-run summary and text, job summary, matrix aggregate — on PASS and
FAIL alike, from one function, with every certificate string escaped."""

from __future__ import annotations

import copy
import re

import pytest

from invarlock.enums import Verdict
from invarlock.github import aggregate, origin, render
from invarlock.github.outcome import Outcome
from tests.certs import synthetic_certificate, with_reference


def _outcome(cert: dict) -> Outcome:
    verdict = Verdict(cert["verdict"]["status"])
    return Outcome(0 if verdict is Verdict.PASS else 1, verdict, cert, None, None)


def _rows(table: str) -> dict[str, list[str]]:
    """Item -> the other cells, read from the Markdown table (escaped pipes are not cells)."""
    out = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| Item"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[cells[0]] = cells[1:]
    return out


@pytest.fixture(scope="module")
def passing():
    return with_reference(synthetic_certificate(shift=0.0, seed=21))


@pytest.fixture(scope="module")
def failing():
    return with_reference(synthetic_certificate(shift=0.2, seed=22), "pull-request",
                          changed=None)


@pytest.mark.parametrize("which", ["passing", "failing"])
def test_every_report_shows_the_reference_on_pass_and_fail(which, request):
    cert = request.getfixturevalue(which)
    report = render.Report("InvarLock", _outcome(cert), render.Links())
    table = origin.table(cert)
    check = render.check_output(report)
    for surface in (render.comment(report, 65_000), render.job_summary(report), check.summary,
                    check.text):
        assert table in surface
    assert check.text.startswith(table)  # before the full certificate, which may be cut
    body = aggregate.render_comment("InvarLock", [aggregate.Row("int8", _outcome(cert))],
                                    run_url=None)
    assert _rows(body.split(origin.HEADING, 1)[1]) == _rows(table)


def test_origin_digest_and_changed_per_item(passing, failing, tmp_path):
    rows = _rows(origin.table(passing))
    assert rows["Baseline"] == ["base branch", "`sha256:" + passing["baseline"][
        "weights_digest"][7:19] + "…`", "no"]
    assert set(rows) == {"Baseline", "Dataset", "Policy (thresholds, window sizes)",
                         r"Preset presets\/ci\.yaml"}
    table = origin.table(failing)
    assert {r[0] for r in _rows(table).values()} == {"pull request"}
    assert {r[2] for r in _rows(table).values()} == {"not compared"}
    assert "not compared with the base branch" in table
    approved = with_reference(passing, "pull-request", changed=("preset:presets/ci.yaml",))
    rows = _rows(origin.table(approved))
    assert rows["Baseline"][2] == "no"
    assert rows["Policy (thresholds, window sizes)"][2] == "⚠️ **yes** (approved change)"
    assert rows[r"Preset presets\/ci\.yaml"][2] == "⚠️ **yes** (approved change)"
    pinned = with_reference(passing, "local", changed=None, pinned=("baseline",), presets=())
    rows = _rows(origin.table(pinned))
    assert rows["Baseline"][0::2] == ["pinned digest", "no (matches the pin)"]
    assert rows["Dataset"][0::2] == ["local files", "—"]


def test_a_certificate_without_a_reference_says_so_and_an_error_shows_nothing(passing):
    old = {k: v for k, v in passing.items() if k != "reference"}
    assert "does not record where" in origin.table(old)
    assert origin.table(None) == ""
    report = render.Report("InvarLock", Outcome.failed(2, "bad input"), render.Links())
    assert origin.HEADING not in render.comment(report, 65_000)


def test_hostile_reference_strings_render_as_text(passing):
    """A certificate is untrusted: its reference strings cannot add cells, tags, mentions
    or links, and a digest that is not one is not shown as code."""
    cert = copy.deepcopy(passing)
    cert["reference"]["presets"][0]["path"] = "a | b <img src=x onerror=alert(1)> @admin `x`"
    cert["reference"]["dataset"]["digest"] = "sha256:[click](https://evil.example)"
    cert["reference"]["baseline"]["origin"] = "<b>trusted</b> | fake"
    table = origin.table(cert)
    for line in table.splitlines():
        if line.startswith("| "):
            assert len(re.findall(r"(?<!\\)\|", line)) == 5, line
    assert "<img" not in table and "<b>" not in table
    assert "@admin" not in table  # a zero-width space keeps GitHub from mentioning
    assert "](https://" not in table and "`sha256:[" not in table


def test_the_aggregate_shows_one_table_for_a_shared_reference_else_one_per_subject(passing):
    other = with_reference(synthetic_certificate(shift=0.0, seed=23), "pull-request",
                           changed=None)
    shared = aggregate.render_comment("InvarLock", [
        aggregate.Row("int8", _outcome(passing)), aggregate.Row("int4", _outcome(passing)),
        aggregate.Row("gptq", Outcome.failed(3, "CUDA out of memory"))], run_url=None)
    assert f"{origin.HEADING} (every subject)" in shared
    assert shared.count("| Baseline |") == 1
    mixed = aggregate.render_comment("InvarLock", [
        aggregate.Row("int8", _outcome(passing)), aggregate.Row("int4", _outcome(other))],
        run_url=None)
    assert "| Subject | Item | Origin |" in mixed
    assert "| int8 | Baseline | base branch |" in mixed
    assert "| int4 | Baseline | pull request |" in mixed
    errors = aggregate.render_comment("InvarLock", [
        aggregate.Row("gptq", Outcome.failed(3, "no report"))], run_url=None)
    assert origin.HEADING not in errors

