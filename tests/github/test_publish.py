"""Publishing under faults, through `main.run` in this process (fast retries injected):
partial permissions, refused bodies, a start that failed, a GitHub outage."""

from __future__ import annotations

import io

from invarlock.github.http import RetryPolicy
from invarlock.github.main import run
from tests.github.conftest import TOKEN, payload, step_environment
from tests.github.standin import Fault, body_too_long_fault, read_only_fault

QUICK = RetryPolicy(attempts=3, backoff=0.01, max_wait=5.0)


def _run(tmp_path, standin, scenario: str = "pass", **inputs: str) -> tuple[int, str, object]:
    step = step_environment(tmp_path, standin.url, "pull_request",
                            payload("pull_request__opened.payload.json"), github_token=TOKEN,
                            output_dir=str(tmp_path / "invarlock-report"), **inputs)
    step.certify_with(scenario)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run(step.env, stdout=stdout, stderr=stderr, policy=QUICK)
    return code, stdout.getvalue(), step


def test_without_checks_permission_the_comment_is_still_written(tmp_path, standin):
    standin.inject("checks/create", read_only_fault())
    code, out, _ = _run(tmp_path, standin, "fail")
    assert code == 1
    assert standin.calls() == ["checks/create -> 403", "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]
    assert "Could not create the check run" in out and "checks: write" in out
    body = standin.comments[2][0]["body"]
    assert "### ❌ InvarLock: FAIL" in body and "[check run]" not in body


def test_a_refused_check_output_is_replaced_by_the_short_report(tmp_path, standin):
    standin.inject("checks/update", Fault(422, {"message": "Validation Failed",
                                               "documentation_url": "x",
                                               "errors": [{"code": "custom",
                                                           "message": "output too long"}]}))
    code, _, _ = _run(tmp_path, standin)
    assert code == 0
    assert standin.calls()[:3] == ["checks/create -> 201", "checks/update -> 422",
                                   "checks/update -> 200"]
    retry = standin.log[2].body["output"]
    assert retry["title"].startswith("PASS: ") and "#### Gates" not in retry["summary"]
    assert "[workflow run](" in retry["summary"]


def test_a_refused_comment_is_replaced_by_the_short_report(tmp_path, standin):
    standin.inject("issues/create-comment", body_too_long_fault())
    code, out, _ = _run(tmp_path, standin)
    assert code == 0
    assert standin.calls()[-3:] == ["issues/create-comment -> 422",
                                    "issues/list-comments -> 200",
                                    "issues/create-comment -> 201"]
    assert "#### Gates" not in standin.comments[2][0]["body"]
    assert "::warning" not in out


def test_when_the_start_was_lost_the_check_is_created_completed(tmp_path, standin):
    standin.inject("checks/create", *[Fault(403, {"message": "rate limit"},
                                            {"retry-after": "60"})])
    code, out, _ = _run(tmp_path, standin)
    assert code == 0
    assert standin.calls()[:2] == ["checks/create -> 403", "checks/create -> 201"]
    assert standin.log[1].body["conclusion"] == "success"
    assert len(standin.check_runs) == 1
    assert "waiting 60 s would exceed the budget" in out


def test_a_github_outage_never_changes_the_exit_code(tmp_path, standin):
    for operation in ("checks/create", "issues/list-comments"):
        standin.inject(operation, *[Fault(503)] * 20)
    code, out, step = _run(tmp_path, standin, "fail")
    assert code == 1
    assert out.count("::warning") == 3  # start, completion, comment
    assert step.outputs["verdict"] == "FAIL"
    assert "### ❌ InvarLock: FAIL" in step.summary


def test_a_defect_while_publishing_is_a_warning_not_a_new_verdict(tmp_path, standin,
                                                                   monkeypatch):
    from invarlock.github.publish import Publisher

    def broken(self, outcome):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(Publisher, "finish", broken)
    code, out, step = _run(tmp_path, standin, "fail")
    assert code == 1
    assert "Publishing failed (complete): RuntimeError: renderer bug" in out
    assert step.outputs["verdict"] == "FAIL"


def test_a_malformed_repository_variable_skips_publishing_only(tmp_path, standin):
    step = step_environment(tmp_path, standin.url, "pull_request",
                            payload("pull_request__opened.payload.json"), github_token=TOKEN,
                            output_dir=str(tmp_path / "invarlock-report"))
    step.env["GITHUB_REPOSITORY"] = "not a repository"
    step.certify_with("pass")
    out = io.StringIO()
    assert run(step.env, stdout=out, stderr=io.StringIO(), policy=QUICK) == 0
    assert "GITHUB_REPOSITORY must be owner/name" in out.getvalue()
    assert standin.log == [] and step.outputs["verdict"] == "PASS"


def _pr_run(tmp_path, standin, scenario: str, run_id: str, **inputs: str) -> int:
    step = step_environment(tmp_path / run_id, standin.url, "pull_request",
                            payload("pull_request__opened.payload.json"), github_token=TOKEN,
                            output_dir=str(tmp_path / run_id / "invarlock-report"), **inputs)
    step.env["GITHUB_RUN_ID"] = run_id
    step.certify_with(scenario)
    return run(step.env, stdout=io.StringIO(), stderr=io.StringIO(), policy=QUICK)


def _writes(standin) -> list[str]:
    return [c for c in standin.calls() if c.split(" ")[0] in ("issues/create-comment",
                                                                "issues/update-comment")]


def test_comment_mode_on_failure_writes_no_comment_for_a_pass_but_keeps_one_current(
        tmp_path, standin):
    assert _pr_run(tmp_path, standin, "pass", "1", comment_mode="on-failure") == 0
    assert _writes(standin) == []
    assert _pr_run(tmp_path, standin, "fail", "2", comment_mode="on-failure") == 1
    assert _pr_run(tmp_path, standin, "pass", "3", comment_mode="on-failure") == 0
    assert _writes(standin) == ["issues/create-comment -> 201", "issues/update-comment -> 200"]
    (comment,) = standin.comments[2]
    assert "✅ InvarLock: PASS" in comment["body"]  # no stale FAIL left behind


def test_comment_mode_on_change_rewrites_only_when_the_verdict_line_changes(tmp_path,
                                                                             standin):
    for run_id in ("1", "2"):  # the second run's footer differs, its verdict line not
        assert _pr_run(tmp_path, standin, "pass", run_id, comment_mode="on-change") == 0
    assert _writes(standin) == ["issues/create-comment -> 201"]
    assert _pr_run(tmp_path, standin, "fail", "3", comment_mode="on-change") == 1
    assert _writes(standin)[-1] == "issues/update-comment -> 200"


def test_comment_mode_always_rewrites_and_off_writes_nothing(tmp_path, standin):
    for run_id in ("1", "2"):
        _pr_run(tmp_path, standin, "pass", run_id)
    assert _writes(standin) == ["issues/create-comment -> 201", "issues/update-comment -> 200"]
    standin.reset_log()
    _pr_run(tmp_path, standin, "fail", "3", comment_mode="off")
    assert not any(c.startswith("issues/") for c in standin.calls())


def test_check_run_id_is_an_output(tmp_path, standin):
    step = step_environment(tmp_path, standin.url, "pull_request",
                            payload("pull_request__opened.payload.json"), github_token=TOKEN,
                            output_dir=str(tmp_path / "invarlock-report"), comment="false")
    step.certify_with("pass")
    assert run(step.env, stdout=io.StringIO(), stderr=io.StringIO(), policy=QUICK) == 0
    (check_id,) = standin.check_runs
    assert step.outputs["check-run-id"] == str(check_id)


HEAD = "c0ffee" + "0" * 34


def _workflow_run_step(tmp_path, standin, **inputs: str):
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    step = step_environment(tmp_path, standin.url, "workflow_run", event, github_token=TOKEN,
                            output_dir=str(tmp_path / "invarlock-report"), **inputs)
    step.certify_with("pass")
    return step


def test_commit_and_pr_number_override_the_event_for_workflow_run(tmp_path, standin):
    standin.pulls[2] = HEAD
    step = _workflow_run_step(tmp_path, standin, commit=HEAD, pr_number="2")
    assert run(step.env, stdout=io.StringIO(), stderr=io.StringIO(), policy=QUICK) == 0
    (check,) = standin.check_runs.values()
    assert check["head_sha"] == HEAD
    assert "✅ InvarLock: PASS" in standin.comments[2][0]["body"]


def test_a_pr_number_whose_head_is_another_commit_gets_no_comment(tmp_path, standin):
    standin.pulls[2] = "1" * 40
    step = _workflow_run_step(tmp_path, standin, commit=HEAD, pr_number="2")
    out = io.StringIO()
    assert run(step.env, stdout=out, stderr=io.StringIO(), policy=QUICK) == 0
    assert 2 not in standin.comments and "has moved on" in out.getvalue()
    assert next(iter(standin.check_runs.values()))["head_sha"] == HEAD
