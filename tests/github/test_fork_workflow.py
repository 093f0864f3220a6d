""".github/workflows/certify-fork.yml: the trusted run that gives a fork's pull request the
required `InvarLock` check, only after a maintainer's approval.

The workflow runs with this repository's write token on a self-hosted GPU runner, so each of
its safety properties is a test: the trigger, the two approvals (label and protected
environment), the fork's head checked out by commit as data without credentials, the action
and the reference taken from the base commit, minimal permissions, a new push dropping the
approval, and no job whose own check could be mistaken for the required one. The last tests
run the workflow's certify step through action.yml's steps (fake docker, API stand-in).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.github.conftest import ROOT, payload
from tests.github.test_action_composite import Runner
from tests.github.test_action_files import load_yaml
from tests.github.test_reference import _as_text, _repository, _swap

WORKFLOW = ROOT / ".github" / "workflows" / "certify-fork.yml"
LABEL = "safe-to-certify"
HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"  # pull_request__synchronize's head


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return load_yaml(WORKFLOW)


def _certify(workflow: dict[str, Any]) -> dict[str, Any]:
    return workflow["jobs"]["certify"]


def _checkouts(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/checkout@")]


def _action_step(job: dict[str, Any]) -> dict[str, Any]:
    (step,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("./")]
    return step


def _condition(job: dict[str, Any]) -> str:
    return " ".join(str(job.get("if", "")).split())


# ----------------------------------------------------------------------------- the workflow


def test_runs_on_pull_request_target_for_labels_and_pushes_only(workflow):
    """`pull_request_target` runs the base branch's copy of this file (a fork cannot edit
    it); `labeled` starts a certification, `synchronize` only withdraws the approval."""
    assert workflow["on"] == {"pull_request_target": {"types": ["labeled", "synchronize"]}}
    assert workflow["permissions"] == {}
    concurrency = workflow["concurrency"]
    assert "github.event.pull_request.number" in concurrency["group"]
    assert concurrency["cancel-in-progress"] is True  # a new push stops a waiting run


def test_certifies_only_a_labelled_fork_head_in_a_protected_environment(workflow):
    job = _certify(workflow)
    condition = _condition(job)
    assert "github.event.action == 'labeled'" in condition
    assert f"github.event.label.name == '{LABEL}'" in condition
    assert "github.event.pull_request.head.repo.full_name != github.repository" in condition
    assert "||" not in condition  # every clause is required
    environment = job["environment"]
    name = environment["name"] if isinstance(environment, dict) else environment
    assert name == "invarlock-fork"  # required reviewers approve each run
    assert "${{" not in name  # never chosen by the event
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert job["timeout-minutes"] <= 180


def test_permissions_are_minimal(workflow):
    assert _certify(workflow)["permissions"] == {"contents": "read", "checks": "write",
                                                 "pull-requests": "write"}
    assert workflow["jobs"]["drop-approval"]["permissions"] == {"pull-requests": "write"}
    for job in workflow["jobs"].values():
        assert "secrets" not in json.dumps(job)  # no repository secret reaches these jobs


def test_the_fork_head_is_checked_out_by_commit_as_data_without_credentials(workflow):
    job = _certify(workflow)
    head, base = _checkouts(job)
    for checkout in (head, base):
        assert checkout["with"]["persist-credentials"] is False
        assert "repository" not in checkout["with"]  # both commits from this repository
    # pinned to the commit that was labelled, never a branch name the fork can move
    assert head["with"]["ref"] == "${{ github.event.pull_request.head.sha }}"
    assert "path" not in head["with"]
    assert base["with"]["ref"] == "${{ github.event.pull_request.base.sha }}"
    steps = job["steps"]
    assert steps.index(head) < steps.index(base) < steps.index(_action_step(job))


def test_no_code_from_the_fork_runs(workflow):
    """The action comes from the base checkout; the only script is the base-folder guard,
    which reads nothing from the fork's files."""
    job = _certify(workflow)
    base_path = _checkouts(job)[1]["with"]["path"]
    assert _action_step(job)["uses"] == f"./{base_path}"  # never `./`: the fork's action.yml
    for step in job["steps"]:
        if "uses" in step:
            assert step["uses"].startswith(("actions/checkout@", f"./{base_path}")), step
    (script,) = [s["run"] for s in job["steps"] if "run" in s]
    commands = {line.split()[0] for line in script.splitlines() if line.strip()}
    assert commands <= {"if", "echo", "exit", "fi"}, commands
    assert f"[ -e {base_path} ] || [ -L {base_path} ]" in script
    # the guard runs before the base checkout could land inside a folder the fork made
    steps = job["steps"]
    guard = next(s for s in steps if "run" in s)
    assert steps.index(_checkouts(job)[0]) < steps.index(guard) < \
        steps.index(_checkouts(job)[1])


def test_the_reference_comes_from_the_base_and_cannot_be_changed_by_the_fork(workflow):
    job = _certify(workflow)
    with_ = _action_step(job)["with"]
    assert with_["reference-path"] == _checkouts(job)[1]["with"]["path"]
    assert with_["allow-reference-change"] == "false"
    assert not {"check-name", "name", "mode", "check-run", "relevant"} & set(with_)


def test_a_new_push_removes_the_label(workflow):
    job = workflow["jobs"]["drop-approval"]
    condition = _condition(job)
    assert "github.event.action == 'synchronize'" in condition
    assert f"contains(github.event.pull_request.labels.*.name, '{LABEL}')" in condition
    assert job["runs-on"] == "ubuntu-latest"  # no GPU runner, no checkout of anything
    (step,) = job["steps"]
    assert "uses" not in step
    assert re.fullmatch(r'gh api --method DELETE "repos/\$REPOSITORY/issues/\$NUMBER/labels/'
                        + LABEL + '"', step["run"].strip())
    assert step["env"]["NUMBER"] == "${{ github.event.pull_request.number }}"


def test_no_job_is_named_like_the_required_check(workflow):
    """A job's own check has the job's name: one called `InvarLock` would satisfy the
    required check by merely succeeding."""
    for job_id, job in workflow["jobs"].items():
        for name in (job_id, str(job.get("name", ""))):
            assert not name.lower().startswith("invarlock"), name


def test_the_docs_describe_the_shipped_workflow():
    docs = (ROOT / "docs" / "action.md").read_text(encoding="utf-8")
    assert "certify-fork.yml" in docs and LABEL in docs and "invarlock-fork" in docs


# ----------------------------------------------------------------------------- the run


def _approved_run(tmp_path: Path, standin, workflow: dict[str, Any]) -> Runner:
    """The certify step as the workflow gives it: labelled event, write token."""
    runner = Runner(tmp_path, standin.url, "pass", **_action_step(_certify(workflow))["with"])
    event = payload("pull_request__synchronize.payload.json")
    event["action"] = "labeled"
    event["label"] = {"name": LABEL}
    event["pull_request"]["head"]["repo"]["full_name"] = "contributor/Hello-World"
    runner.event.write_text(json.dumps(event))
    runner.env["GITHUB_EVENT_NAME"] = "pull_request_target"
    runner.env["GITHUB_REF"] = "refs/heads/main"
    _repository(runner.workspace)
    _repository(runner.workspace / "base")
    return runner


def _argument(argv: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(flag + "="))


def test_the_approved_run_posts_the_required_check_on_the_labelled_head(tmp_path, standin,
                                                                        workflow):
    runner = _approved_run(tmp_path, standin, workflow)
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "0", results["certify"].stdout
    (run,) = standin.check_runs.values()
    assert (run["name"], run["head_sha"], run["conclusion"]) == ("InvarLock", HEAD_SHA,
                                                                 "success")
    # the check run (summary and text) and the comment say the bar is the base branch's
    (comment,) = standin.comments[2]
    for surface in (run["output"]["summary"], run["output"]["text"], comment["body"]):
        assert "| Baseline | base branch | `sha256:" in surface
        assert "| Dataset | base branch | `sha256:" in surface
    argv = runner.certifier_argv()
    assert _argument(argv, "--reference-origin") == "base-checkout"
    assert _argument(argv, "--cache-namespace") == "untrusted"  # the fork's results stay apart


def test_the_approved_run_fails_a_fork_that_swaps_the_baseline(tmp_path, standin, workflow):
    runner = _approved_run(tmp_path, standin, workflow)
    _swap(runner.workspace, "baseline")
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "2"
    assert not (tmp_path / "certifier-calls.jsonl").exists()  # nothing was evaluated
    (run,) = standin.check_runs.values()
    assert (run["name"], run["conclusion"]) == ("InvarLock", "failure")
    assert "baseline `models/base` (changed)" in _as_text(run["output"]["summary"])
