"""Fail closed: whatever goes wrong, in every mode, ends as a `failure` check run that says
why, with an exit code that is neither PASS (0) nor FAIL (1, which `fail-on-gate: false`
turns green). Crafted artifacts are refused before anything is read from them.

Through `main.run` in this process, against the API stand-in (fast retries injected).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from invarlock.github.artifact import RESULT_FILENAME, write_result
from invarlock.github.event import RecordedTarget
from invarlock.github.http import RetryPolicy
from invarlock.github.main import run
from invarlock.github.outcome import EXIT_INTERNAL, Outcome
from tests.github.conftest import TOKEN, payload, step_environment, write_report

QUICK = RetryPolicy(attempts=3, backoff=0.01, max_wait=5.0)
HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def _publish(tmp_path: Path, standin, report: Path) -> tuple[int, str, str, object]:
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    event["workflow_run"]["head_sha"] = HEAD_SHA
    step = step_environment(tmp_path / "publish-run", standin.url, "workflow_run", event,
                            github_token=TOKEN, mode="publish", certificate=str(report),
                            comment="false")
    out, err = io.StringIO(), io.StringIO()
    code = run(step.env, stdout=out, stderr=err, policy=QUICK)
    return code, out.getvalue(), err.getvalue(), step


def _genuine_report(folder: Path, certificates) -> Path:
    path = write_report(folder, certificates["pass"])
    write_result(folder, Outcome(0, None, None, path, None),
                 RecordedTarget("pull_request", HEAD_SHA, 2, None), "")
    return folder


def _only_check(standin) -> dict:
    (check,) = standin.check_runs.values()
    return check


def _crafted(text: bytes | None = None, **fields) -> bytes:
    if text is not None:
        return text
    data = {"format": "invarlock.action-result", "version": 1, "name": "", "exit_code": 0,
            "verdict": "PASS", "error": None, "certificate": "evaluation.cert.json",
            "target": {"event_name": "pull_request", "head_sha": HEAD_SHA, "pull_request": 2,
                       "run_url": None, "files": []}}
    for key, value in fields.items():
        if key.startswith("target_"):
            data["target"][key.removeprefix("target_")] = value
        else:
            data[key] = value
    return json.dumps(data).encode()


CRAFTED = {
    "files-not-a-list": (_crafted(target_files=5), "'target.files' must be a list"),
    "invalid-utf8": (b'{"format": "invarlock.action-result", "name": "\xff\xfe"}',
                     "is not UTF-8 text"),
    "deeply-nested": (b'{"format": "invarlock.action-result", "x": ' + b"[" * 100_00
                      + b"]" * 100_00 + b"}", "nested deeper than"),
    "exit-code-256": (_crafted(exit_code=256, verdict=None), "'exit_code' must be one of"),
    "exit-code-as-text": (_crafted(exit_code="0"), "'exit_code' must be one of"),
    "exit-code-true": (_crafted(exit_code=True), "'exit_code' must be one of"),
    "pull-request-as-text": (_crafted(target_pull_request="2"), "'target.pull_request'"),
    "too-large": (b" " * (64 * 1024 + 1), "more than the"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_result_file_is_a_clean_failure_check(tmp_path, standin, certificates, case):
    text, message = CRAFTED[case]
    report = _genuine_report(tmp_path / "report", certificates)
    (report / RESULT_FILENAME).write_bytes(text)
    code, out, err, _ = _publish(tmp_path, standin, report)
    assert code not in (0, 1), out
    assert "Traceback" not in err + out
    check = _only_check(standin)
    assert (check["status"], check["conclusion"]) == ("completed", "failure")
    assert message in check["output"]["title"] + check["output"]["summary"]


def test_an_exit_code_of_256_without_a_certificate_is_not_a_pass(tmp_path, standin):
    """256 would leave the process with status 0 (256 mod 256) and the Gate would say PASS."""
    report = tmp_path / "report"
    report.mkdir()
    (report / RESULT_FILENAME).write_bytes(_crafted(exit_code=256, verdict=None,
                                                    certificate=None))
    code, _, _, step = _publish(tmp_path, standin, report)
    assert code == 3 and code % 256 != 0
    assert step.outputs["exit-code"] == "3" and step.outputs["verdict"] == ""
    assert _only_check(standin)["conclusion"] == "failure"


def test_a_fifo_in_place_of_the_result_is_refused_without_blocking(tmp_path, standin,
                                                                    certificates):
    report = _genuine_report(tmp_path / "report", certificates)
    (report / RESULT_FILENAME).unlink()
    os.mkfifo(report / RESULT_FILENAME)
    code, _, _, _ = _publish(tmp_path, standin, report)
    assert code not in (0, 1)
    assert "is not a regular file" in _only_check(standin)["output"]["title"]


def test_a_missing_artifact_is_a_failure_check(tmp_path, standin):
    code, _, _, _ = _publish(tmp_path, standin, tmp_path / "never-downloaded")
    assert code == 3
    check = _only_check(standin)
    assert check["conclusion"] == "failure" and "no report at" in check["output"]["title"]
    assert check["head_sha"] == HEAD_SHA


def _certify_step(tmp_path: Path, standin, scenario: str = "pass", **inputs: str):
    step = step_environment(tmp_path, standin.url, "pull_request",
                            payload("pull_request__opened.payload.json"), github_token=TOKEN,
                            output_dir=str(tmp_path / "invarlock-report"), **inputs)
    step.certify_with(scenario)
    return step


def test_an_internal_error_while_certifying_completes_the_open_check_as_failure(
        tmp_path, standin, monkeypatch):
    import invarlock.github.certify_mode as certify_mode

    def broken(*args, **kwargs):
        raise RuntimeError("writer bug")

    monkeypatch.setattr(certify_mode, "write_result", broken)
    step = _certify_step(tmp_path, standin)
    out, err = io.StringIO(), io.StringIO()
    code = run(step.env, stdout=out, stderr=err, policy=QUICK)
    assert code == EXIT_INTERNAL
    assert "::error title=InvarLock%3A internal error::internal error: RuntimeError: writer bug" \
        in out.getvalue()
    check = _only_check(standin)  # the check run opened at the start, not a second one
    assert (check["status"], check["conclusion"]) == ("completed", "failure")
    assert "writer bug" in check["output"]["title"]
    assert step.outputs["exit-code"] == str(EXIT_INTERNAL)


def test_an_internal_error_in_aggregate_mode_is_a_failure_check(tmp_path, standin,
                                                                monkeypatch):
    import invarlock.github.aggregate as aggregate

    def broken(*args, **kwargs):
        raise KeyError("rows")

    monkeypatch.setattr(aggregate, "load_rows", broken)
    step = _certify_step(tmp_path, standin, mode="aggregate", certificate=str(tmp_path))
    code = run(step.env, stdout=io.StringIO(), stderr=io.StringIO(), policy=QUICK)
    assert code == EXIT_INTERNAL
    assert _only_check(standin)["conclusion"] == "failure"


def test_a_pass_whose_report_cannot_be_published_is_not_a_pass(tmp_path, standin,
                                                               monkeypatch):
    """A renderer defect must neither leave the check open nor let the job pass unseen."""
    from invarlock.github.publish import Publisher

    def broken(self, outcome):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(Publisher, "finish", broken)
    step = _certify_step(tmp_path, standin, "pass")
    code = run(step.env, stdout=io.StringIO(), stderr=io.StringIO(), policy=QUICK)
    assert code == EXIT_INTERNAL
    check = _only_check(standin)
    assert (check["status"], check["conclusion"]) == ("completed", "failure")
    assert step.outputs["exit-code"] == str(EXIT_INTERNAL)


def test_an_artifact_error_cannot_issue_workflow_commands(tmp_path, standin):
    report = tmp_path / "report"
    report.mkdir()
    hostile = "oom\n::add-mask::ghs_x\n::set-output name=verdict::PASS <img src=x>"
    (report / RESULT_FILENAME).write_bytes(_crafted(exit_code=3, verdict=None,
                                                    certificate=None, error=hostile))
    code, out, _, step = _publish(tmp_path, standin, report)
    assert code == 3 and step.outputs["verdict"] == ""
    commands = [line.split("::")[1].split(" ")[0] for line in out.splitlines()
                if line.startswith("::")]
    assert set(commands) <= {"add-mask", "error", "warning", "notice"}
    assert "::set-output" not in out and "::add-mask::ghs_x" not in out
    summary = _only_check(standin)["output"]["summary"]
    assert "<img" not in summary and "&lt;img" in summary
