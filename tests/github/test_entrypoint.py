"""The entrypoint as the container runs it (`./entrypoint`, a separate process), against the
API stand-in with real event payloads and a stand-in certifier (INVARLOCK_CERTIFY_COMMAND)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.github.conftest import ROOT, TOKEN, StepEnvironment, payload, step_environment

HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def run_entrypoint(step: StepEnvironment) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "entrypoint")], env=step.env,
                          cwd=step.root, capture_output=True, text=True, timeout=120)


def pr_step(tmp_path: Path, standin, scenario: str, run_id: str, **inputs: str) -> StepEnvironment:
    step = step_environment(tmp_path, standin.url, "pull_request",
                            payload("pull_request__synchronize.payload.json"),
                            github_token=TOKEN, **inputs)
    step.env["GITHUB_RUN_ID"] = run_id
    step.certify_with(scenario)
    return step


def test_pass_then_fail_one_check_run_each_and_one_comment_updated(tmp_path, standin):
    first = pr_step(tmp_path, standin, "pass", "100", profile="dev")
    done = run_entrypoint(first)
    assert done.returncode == 0, done.stderr
    assert standin.calls() == ["checks/create -> 201", "checks/update -> 200",
                               "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]
    create, update = standin.log[0].body, standin.log[1].body
    assert create["head_sha"] == HEAD_SHA and create["status"] == "in_progress"
    assert create["name"] == "InvarLock" and create["external_id"] == "invarlock:100:1"
    assert create["details_url"] == "https://github.com/Codertocat/Hello-World/actions/runs/100"
    assert update["conclusion"] == "success" and update["output"]["title"].startswith("PASS: ")
    assert update["output"]["summary"].startswith("### ✅ InvarLock: PASS")
    assert first.outputs["verdict"] == "PASS" and first.outputs["exit-code"] == "0"
    assert first.outputs["check-run-url"].endswith(f"/runs/{min(standin.check_runs)}")
    assert "### ✅ InvarLock: PASS" in first.summary
    comment_id = standin.comments[2][0]["id"]

    standin.reset_log()
    second = pr_step(tmp_path, standin, "fail", "101", profile="dev")
    done = run_entrypoint(second)
    assert done.returncode == 1, done.stderr
    assert standin.calls() == ["checks/create -> 201", "checks/update -> 200",
                               "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/update-comment -> 200"]
    assert [c["id"] for c in standin.comments[2]] == [comment_id]
    assert "### ❌ InvarLock: FAIL" in standin.comments[2][0]["body"]
    runs = [standin.check_runs[k] for k in sorted(standin.check_runs)]
    assert [(r["head_sha"], r["status"], r["conclusion"]) for r in runs] == [
        (HEAD_SHA, "completed", "success"), (HEAD_SHA, "completed", "failure")]
    assert second.outputs["verdict"] == "FAIL"
    report = Path(second.outputs["certificate-path"])
    assert report.is_absolute() and report.is_file()
    assert Path(second.outputs["report-path"]).name == "evaluation.cert.md"
    result = json.loads((report.parent / "invarlock-action.json").read_text())
    assert result["target"] == {"event_name": "pull_request", "head_sha": HEAD_SHA,
                                "pull_request": 2,
                                "run_url": "https://github.com/Codertocat/Hello-World/"
                                           "actions/runs/101", "files": []}
    argv = second.certifier_calls()[-1]["argv"]
    assert "--profile=dev" in argv and "--tier=balanced" in argv and "--json" in argv


def test_the_token_is_masked_and_never_printed_or_passed_on(tmp_path, standin):
    step = pr_step(tmp_path, standin, "error3", "102")
    step.env.pop("INPUT_GITHUB_TOKEN")
    step.env["INPUT_GITHUB-TOKEN"] = TOKEN  # the spelling docker actions receive
    step.env["GITHUB_TOKEN"] = TOKEN
    done = run_entrypoint(step)
    assert done.returncode == 3
    lines_with_token = [line for line in done.stdout.splitlines() if TOKEN in line]
    assert lines_with_token == [f"::add-mask::{TOKEN}"]
    assert done.stdout.index("::add-mask::") == 0  # before anything else is written
    assert TOKEN not in done.stderr
    assert TOKEN not in step.summary and TOKEN not in Path(step.env["GITHUB_OUTPUT"]).read_text()
    for path in (tmp_path / "invarlock-report").iterdir():
        assert TOKEN not in path.read_text()
    child_env = step.certifier_calls()[-1]["env_keys"]
    assert not {"GITHUB_TOKEN", "INPUT_GITHUB_TOKEN", "INPUT_GITHUB-TOKEN"} & set(child_env)
    assert standin.log[0].method == "POST"  # and the token did work


def test_a_certifier_error_is_a_failed_check_and_keeps_its_exit_code(tmp_path, standin):
    step = pr_step(tmp_path, standin, "error2", "103")
    done = run_entrypoint(step)
    assert done.returncode == 2
    run = standin.check_runs[min(standin.check_runs)]
    assert run["conclusion"] == "failure"  # neutral would let branch protection pass it
    assert run["output"]["title"].startswith("Could not certify (exit 2): --dataset is required")
    assert "could not certify" in standin.comments[2][0]["body"]
    assert step.outputs["verdict"] == "" and step.outputs["exit-code"] == "2"
    assert "::error title=InvarLock%3A could not certify::--dataset is required" in done.stdout


def test_read_only_token_on_a_fork_skips_publishing_but_not_the_verdict(tmp_path, standin):
    event = payload("pull_request__synchronize.payload.json")
    event["pull_request"]["head"]["repo"]["full_name"] = "contributor/Hello-World"
    step = step_environment(tmp_path, standin.url, "pull_request", event,
                            github_token="ghs_ReadOnly")
    step.certify_with("fail")
    done = run_entrypoint(step)
    assert done.returncode == 1  # FAIL stays FAIL
    assert standin.calls() == ["checks/create -> 403", "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/create-comment -> 403"]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("::warning")]
    assert len(warnings) == 2
    assert all("Resource not accessible by integration" in w for w in warnings)
    assert all("workflow_run" in w and "mode: publish" in w for w in warnings)
    assert step.outputs["verdict"] == "FAIL" and step.outputs["check-run-url"] == ""
    assert "### ❌ InvarLock: FAIL" in step.summary
    assert (tmp_path / "invarlock-report" / "evaluation.cert.json").is_file()


def test_push_events_get_a_check_run_on_github_sha_and_no_comment(tmp_path, standin):
    step = step_environment(tmp_path, standin.url, "push",
                            payload("push__with-new-branch.payload.json"), github_token=TOKEN)
    step.env["GITHUB_SHA"] = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    step.certify_with("pass")
    assert run_entrypoint(step).returncode == 0
    assert standin.calls() == ["checks/create -> 201", "checks/update -> 200"]
    assert standin.log[0].body["head_sha"] == "6113728f27ae82c7b1a177c8d03f9e96e0adf246"


def test_nothing_is_sent_when_publishing_is_off(tmp_path, standin):
    step = pr_step(tmp_path, standin, "pass", "104", check_run="false", comment="false")
    assert run_entrypoint(step).returncode == 0
    assert standin.log == []
    assert step.outputs["verdict"] == "PASS"


def test_bad_input_stops_before_anything_runs_and_fails_the_check(tmp_path, standin):
    """Bad input is a red check run with its one line, not a check that never appears."""
    step = pr_step(tmp_path, standin, "pass", "105", comment="sometimes")
    done = run_entrypoint(step)
    assert done.returncode == 2
    assert done.stdout.startswith(f"::add-mask::{TOKEN}\n")  # masked even before validation
    assert "::error title=InvarLock%3A bad input::input 'comment' must be true or false" in \
        done.stdout
    assert not (tmp_path / "certifier-calls.jsonl").exists()
    assert standin.calls() == ["checks/create -> 201"]
    (run,) = standin.check_runs.values()
    assert (run["name"], run["head_sha"], run["conclusion"]) == ("InvarLock", HEAD_SHA, "failure")
    assert "input 'comment' must be true or false" in run["output"]["title"]
    assert step.outputs["exit-code"] == "2" and step.outputs["check-run-id"] == str(run["id"])


def _certified_fork_report(tmp_path: Path, standin) -> Path:
    """What a fork's certifying run leaves in its artifact (read-only token: unpublished)."""
    event = payload("pull_request__synchronize.payload.json")
    event["pull_request"]["head"]["repo"]["full_name"] = "contributor/Hello-World"
    step = step_environment(tmp_path / "fork-run", standin.url, "pull_request", event,
                            github_token="ghs_ReadOnly", comment="false", check_run="false")
    step.certify_with("fail")
    assert run_entrypoint(step).returncode == 1
    return tmp_path / "fork-run" / "invarlock-report"


def _publish_step(tmp_path: Path, standin, report: Path, *, listed: bool) -> StepEnvironment:
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    event["workflow_run"]["head_sha"] = HEAD_SHA
    if not listed:
        event["workflow_run"]["pull_requests"] = []  # what GitHub sends for forks
    return step_environment(tmp_path / "publish-run", standin.url, "workflow_run", event,
                            github_token=TOKEN, mode="publish", certificate=str(report))


def test_publish_mode_reports_a_fork_result_after_checking_the_pull_request(tmp_path, standin):
    report = _certified_fork_report(tmp_path, standin)
    standin.pulls[2] = HEAD_SHA
    step = _publish_step(tmp_path, standin, report, listed=False)
    done = run_entrypoint(step)
    assert done.returncode == 1, done.stderr
    assert standin.calls() == ["pulls/get -> 200", "checks/create -> 201",
                               "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]
    create = standin.log[1].body
    assert create["head_sha"] == HEAD_SHA and create["conclusion"] == "failure"
    assert create["details_url"] == "https://github.com/octo-org/octo-repo/actions/runs/289782451"
    # published under its own name: a fork's result never satisfies the required check
    assert create["name"] == "InvarLock (fork, unverified)"
    assert "### ❌ InvarLock \\(fork, unverified\\): FAIL" in standin.comments[2][0]["body"]
    assert step.outputs["verdict"] == "FAIL"
    assert step.outputs["certificate-path"] == str((report / "evaluation.cert.json").resolve())


def test_publish_mode_uses_the_pull_request_github_lists(tmp_path, standin):
    report = _certified_fork_report(tmp_path, standin)
    step = _publish_step(tmp_path, standin, report, listed=True)
    assert run_entrypoint(step).returncode == 1
    assert standin.calls() == ["checks/create -> 201", "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]


def test_publish_mode_will_not_comment_on_a_pull_request_that_moved_on(tmp_path, standin):
    report = _certified_fork_report(tmp_path, standin)
    standin.pulls[2] = "0" * 40
    done = run_entrypoint(_publish_step(tmp_path, standin, report, listed=False))
    assert done.returncode == 1
    assert standin.calls() == ["pulls/get -> 200", "checks/create -> 201"]
    assert "has moved on" in done.stdout


def test_publish_mode_refuses_a_tampered_certificate_with_a_failed_check(tmp_path, standin):
    report = _certified_fork_report(tmp_path, standin)
    cert = report / "evaluation.cert.json"
    data = json.loads(cert.read_text())
    data["verdict"]["status"] = "PASS"
    cert.write_text(json.dumps(data))
    standin.pulls[2] = HEAD_SHA
    done = run_entrypoint(_publish_step(tmp_path, standin, report, listed=True))
    assert done.returncode == 3
    run = standin.check_runs[min(standin.check_runs)]
    assert run["conclusion"] == "failure" and "content digest mismatch" in run["output"]["title"]


def test_publish_mode_refuses_a_resealed_certificate_whose_numbers_disagree(tmp_path, standin):
    """A fork can recompute the digest after editing; the recomputed verdict still differs."""
    from invarlock.certificate import document

    report = _certified_fork_report(tmp_path, standin)
    cert = report / "evaluation.cert.json"
    data = json.loads(cert.read_text())
    data["verdict"]["status"] = "PASS"
    data["verdict"]["reasons"] = ["all 4 gating checks passed"]
    data["digest"] = document.content_digest(data)
    cert.write_text(json.dumps(data))
    done = run_entrypoint(_publish_step(tmp_path, standin, report, listed=True))
    assert done.returncode == 3
    (run,) = standin.check_runs.values()
    assert run["conclusion"] == "failure"
    assert "does not verify" in run["output"]["title"]
    assert "### ✅" not in standin.comments[2][0]["body"]


def test_publish_mode_refuses_a_report_made_for_another_commit(tmp_path, standin):
    report = _certified_fork_report(tmp_path, standin)
    step = _publish_step(tmp_path, standin, report, listed=True)
    event = json.loads(Path(step.env["GITHUB_EVENT_PATH"]).read_text())
    event["workflow_run"]["head_sha"] = "1" * 40  # the run was for another head
    Path(step.env["GITHUB_EVENT_PATH"]).write_text(json.dumps(event))
    done = run_entrypoint(step)
    assert done.returncode == 3
    (run,) = standin.check_runs.values()
    assert run["head_sha"] == "1" * 40 and run["conclusion"] == "failure"
    assert "does not bind to commit 111111111111" in run["output"]["title"]
    assert step.outputs["verdict"] == ""


def test_publish_mode_refuses_a_bare_certificate_that_names_no_commit(tmp_path, standin):
    report = _certified_fork_report(tmp_path, standin)
    (report / "invarlock-action.json").unlink()
    done = run_entrypoint(_publish_step(tmp_path, standin, report, listed=True))
    assert done.returncode == 3
    (run,) = standin.check_runs.values()
    assert run["conclusion"] == "failure" and "records no commit" in run["output"]["title"]


def test_ghes_api_base_is_followed(tmp_path):
    from tests.github.standin import GitHubStandIn

    with GitHubStandIn(tokens={TOKEN: "write"}, prefix="/api/v3") as ghes:
        step = pr_step(tmp_path, ghes, "pass", "106")
        assert run_entrypoint(step).returncode == 0
        assert all(r.path.startswith("/api/v3/") for r in ghes.log)
        assert len(ghes.log) == 5 and ghes.problems == []


def test_an_entrypoint_that_cannot_load_exits_4_not_the_fail_code(tmp_path):
    """A traceback exits 1, which is FAIL (advisory with `fail-on-gate: false`)."""
    (tmp_path / "invarlock" / "github").mkdir(parents=True)
    (tmp_path / "invarlock" / "__init__.py").write_text("")
    (tmp_path / "invarlock" / "github" / "__init__.py").write_text("")
    (tmp_path / "invarlock" / "github" / "main.py").write_text("raise ImportError('broken')\n")
    script = tmp_path / "entrypoint"
    script.write_text((ROOT / "entrypoint").read_text())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 4
    assert "::error title=InvarLock: internal error::cannot load the Action: ImportError" in \
        done.stdout
    assert "Traceback" not in done.stderr
