"""Two flows across jobs, each job run with action.yml's own steps (tests/github/
test_action_composite.py's Runner) against the API stand-in:

- fork pull requests: the certify job (read-only token) writes and "uploads" its report; the
  publish job, in another working directory on another "runner", reads the downloaded copy
  from outside its workspace, without the image, and binds it to the workflow_run;
- a matrix: one job per subject (own check run and artifact), then one aggregate comment.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from invarlock.github.artifact import write_result
from invarlock.github.comments import marker
from invarlock.github.event import RecordedTarget
from invarlock.github.outcome import Outcome
from tests.github.conftest import payload, write_report
from tests.github.test_action_composite import Runner

HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"  # pull_request__synchronize's head


def _fork_certify_job(tmp_path: Path, standin, scenario: str) -> Path:
    runner = Runner(tmp_path / "gpu-runner", standin.url, scenario,
                    **{"github-token": "ghs_ReadOnly"})
    event = payload("pull_request__synchronize.payload.json")
    event["pull_request"]["head"]["repo"]["full_name"] = "contributor/Hello-World"
    runner.event.write_text(json.dumps(event))
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] in {"0", "1"}, results["certify"].stdout
    assert "mode: publish" in results["certify"].stdout  # the read-only token is explained
    assert standin.check_runs == {} and standin.comments == {}
    standin.reset_log()
    return Path(results["certify"].outputs["report-dir"])


def _publish_job(tmp_path: Path, standin, downloaded: Path, head_sha: str) -> Runner:
    runner = Runner(tmp_path / "hosted-runner", standin.url, "pass", mode="publish",
                    certificate=str(downloaded), **{"reporter-python": sys.executable,
                                                    "fail-on-gate": "false"})
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    event["workflow_run"]["head_sha"] = head_sha
    event["workflow_run"]["pull_requests"] = []  # what GitHub sends for forks
    runner.event.write_text(json.dumps(event))
    runner.env["GITHUB_EVENT_NAME"] = "workflow_run"
    runner.env["GITHUB_REF"] = "refs/heads/main"
    return runner


@pytest.mark.parametrize(("scenario", "conclusion"), [("pass", "success"), ("fail", "failure")])
def test_fork_flow_end_to_end(tmp_path, standin, scenario, conclusion):
    report = _fork_certify_job(tmp_path, standin, scenario)
    # actions/upload-artifact, then actions/download-artifact into the publisher's temp folder
    downloaded = tmp_path / "hosted-runner" / "work" / "_temp" / "invarlock-report"
    shutil.copytree(report, downloaded)
    standin.pulls[2] = HEAD_SHA
    runner = _publish_job(tmp_path, standin, downloaded, HEAD_SHA)
    assert not downloaded.is_relative_to(runner.workspace)  # outside the workspace
    results = runner.run_job()
    assert not runner.record.exists()  # no image, no docker
    expected = "0" if scenario == "pass" else "1"
    assert results["certify"].outputs["exit-code"] == expected, results["certify"].stdout
    assert results["Gate"].returncode == 0  # advisory in the publishing workflow
    (run,) = standin.check_runs.values()
    assert (run["head_sha"], run["status"], run["conclusion"]) == (HEAD_SHA, "completed",
                                                                     conclusion)
    assert standin.calls()[0] == "pulls/get -> 200"  # the recorded PR number is confirmed
    assert run["name"] == "InvarLock (fork, unverified)"  # never the required check's name
    (comment,) = standin.comments[2]
    assert comment["body"].startswith(marker("InvarLock (fork, unverified)"))
    verdict = "✅" if scenario == "pass" else "❌"
    assert f"### {verdict} InvarLock \\(fork, unverified\\): {scenario.upper()}" in \
        comment["body"]


def test_fork_flow_refuses_a_report_for_another_head(tmp_path, standin):
    report = _fork_certify_job(tmp_path, standin, "pass")
    downloaded = tmp_path / "hosted-runner" / "work" / "_temp" / "invarlock-report"
    shutil.copytree(report, downloaded)
    standin.pulls[2] = "2" * 40
    runner = _publish_job(tmp_path, standin, downloaded, "2" * 40)
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "3"
    assert results["Gate"].returncode == 1
    (run,) = standin.check_runs.values()
    assert run["head_sha"] == "2" * 40 and run["conclusion"] == "failure"
    assert "does not bind" in run["output"]["title"]
    assert 2 not in standin.comments  # the recorded pull request number is not trusted


def _matrix_reports(folder: Path, certificates) -> None:
    """What actions/download-artifact leaves for pattern invarlock-certificate-*."""
    for name, cert in (("int8", "pass"), ("int4", "fail"), ("awq", "pass")):
        sub = folder / f"invarlock-certificate-{name}"
        path = write_report(sub, certificates[cert])
        outcome = Outcome(0 if cert == "pass" else 1, None, None, path, None)
        write_result(sub, outcome, RecordedTarget("pull_request", HEAD_SHA, 2, None), name)
    crashed = folder / "invarlock-certificate-gptq"
    crashed.mkdir()
    write_result(crashed, Outcome.failed(3, "CUDA out of memory"),
                 RecordedTarget("pull_request", HEAD_SHA, 2, None), "gptq")


def test_a_matrix_gets_one_aggregate_comment_with_a_row_per_subject(tmp_path, standin,
                                                                    certificates):
    reports = tmp_path / "downloads"
    _matrix_reports(reports, certificates)
    standin.add_comment(2, marker("InvarLock", aggregate=True) + "\nplanted", login="mallory")

    def aggregate() -> Runner:
        runner = Runner(tmp_path / f"run-{len(standin.log)}", standin.url, "pass",
                        mode="aggregate", certificate=str(reports),
                        **{"reporter-python": sys.executable, "check-run": "false"})
        results = runner.run_job()
        assert results["certify"].outputs["exit-code"] == "3"  # the crashed subject
        return runner

    standin.pulls[2] = HEAD_SHA
    aggregate()
    ours = [c for c in standin.comments[2] if c["user"]["login"] == "github-actions[bot]"]
    assert len(ours) == 1 and standin.comments[2][0]["body"].endswith("planted")
    body = ours[0]["body"]
    assert body.startswith(marker("InvarLock", aggregate=True, head_sha=HEAD_SHA))
    rows = [line for line in body.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| Subject")]
    assert [r.split(" | ")[0] for r in rows] == ["| awq", "| gptq", "| int4", "| int8"]
    assert "2 of 4 subjects pass" in body
    assert "❌ FAIL" in rows[2] and "✅ PASS" in rows[3] and "CUDA out of memory" in rows[1]
    assert standin.check_runs == {}
    before = len(standin.log)
    aggregate()  # a rerun: the same comment, unchanged, is not written again
    assert [r.call for r in standin.log[before:]][-1] == "issues/list-comments -> 200"
    assert len([c for c in standin.comments[2]
                if c["user"]["login"] == "github-actions[bot]"]) == 1


def _aggregate_runner(tmp_path: Path, standin, reports: Path, **inputs: str) -> Runner:
    return Runner(tmp_path / f"run-{len(standin.log)}", standin.url, "pass", mode="aggregate",
                  certificate=str(reports), **{"reporter-python": sys.executable,
                                               "check-run": "false", **inputs})


def test_a_subject_that_never_uploaded_is_a_failing_row(tmp_path, standin, certificates):
    reports = tmp_path / "downloads"
    _matrix_reports(reports, certificates)
    standin.pulls[2] = HEAD_SHA
    runner = _aggregate_runner(tmp_path, standin, reports,
                               subjects="int8, int4, awq, gptq, gguf")
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "3"
    assert results["Gate"].returncode == 1
    body = standin.comments[2][-1]["body"]
    assert "2 of 5 subjects pass" in body  # not "2 of 4": the missing one is counted
    (row,) = [line for line in body.splitlines() if line.startswith("| gguf |")]
    assert "no verdict" in row and "did not" in row


def test_with_no_report_at_all_every_expected_subject_fails(tmp_path, standin):
    standin.pulls[2] = HEAD_SHA
    runner = _aggregate_runner(tmp_path, standin, tmp_path / "nothing-downloaded",
                               subjects="int8\nint4")
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "3"
    assert "0 of 2 subjects pass" in standin.comments[2][-1]["body"]


def test_a_superseded_run_does_not_overwrite_the_newer_comment(tmp_path, standin,
                                                               certificates):
    reports = tmp_path / "downloads"
    _matrix_reports(reports, certificates)
    standin.pulls[2] = "9" * 40  # the pull request has a newer head than this run's
    runner = _aggregate_runner(tmp_path, standin, reports)
    results = runner.run_job()
    assert 2 not in standin.comments
    assert "has moved on" in results["certify"].stdout
    assert standin.calls()[-1] == "pulls/get -> 200"


def test_a_hostile_subject_name_in_an_artifact_renders_as_text(tmp_path, standin,
                                                               certificates):
    reports = tmp_path / "downloads"
    _matrix_reports(reports, certificates)
    hostile = "x](https://evil.example) <img src=x onerror=alert(1)> | @org/team"
    result = reports / "invarlock-certificate-int4" / "invarlock-action.json"
    data = json.loads(result.read_text())
    data["name"] = hostile
    result.write_text(json.dumps(data))
    standin.pulls[2] = HEAD_SHA
    _aggregate_runner(tmp_path, standin, reports).run_job()
    body = standin.comments[2][-1]["body"]
    assert "<img" not in body and "](https://evil" not in body and "@org" not in body
    assert "&lt;img" in body


def test_fork_publishing_handles_matrix_artifacts(tmp_path, standin, certificates):
    """actions/download-artifact with a pattern: one folder per subject's artifact."""
    downloaded = tmp_path / "hosted-runner" / "work" / "_temp" / "invarlock-reports"
    _matrix_reports(downloaded, certificates)
    standin.pulls[2] = HEAD_SHA
    runner = _publish_job(tmp_path, standin, downloaded, HEAD_SHA)
    results = runner.run_job()
    names = sorted(run["name"] for run in standin.check_runs.values())
    assert names == [f"InvarLock ({n}) (fork, unverified)" for n in
                     ("awq", "gptq", "int4", "int8")]
    conclusions = {run["name"]: run["conclusion"] for run in standin.check_runs.values()}
    assert conclusions["InvarLock (gptq) (fork, unverified)"] == "failure"
    # the synthetic certificates bind to the head but were not made by a run: each verifies
    # or fails on its own, and the job's exit code is the worst of them
    assert results["certify"].outputs["exit-code"] == "3"
    (comment,) = standin.comments[2]
    assert "of 4 subjects pass" in comment["body"]
