"""The composite action's own steps, run with bash as the runner would run them.

Expressions are filled in from the inputs and earlier step outputs, each step gets its own
GITHUB_OUTPUT file, and `docker` is tests/github/fake_docker.py: it checks the mounts and runs
the entrypoint with only the forwarded variables, against the GitHub API stand-in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.github.conftest import FAKE_CERTIFIER, ROOT, TOKEN, parse_outputs, payload
from tests.github.test_action_files import load_yaml

ACTION = load_yaml(ROOT / "action.yml")
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


@dataclass
class StepResult:
    returncode: int
    outputs: dict[str, str]
    stdout: str


class Runner:
    """Runs action.yml's steps for one job, like the Actions runner (without Docker)."""

    def __init__(self, tmp: Path, api_url: str, scenario: str, **with_: str) -> None:
        self.tmp = tmp
        self.workspace = tmp / "work" / "repo" / "repo"
        self.workspace.mkdir(parents=True)
        temp = tmp / "work" / "_temp"
        (temp / "_github_workflow").mkdir(parents=True)
        self.commands = temp / "_runner_file_commands"
        self.commands.mkdir()
        event = temp / "_github_workflow" / "event.json"
        event.write_text(json.dumps(payload("pull_request__synchronize.payload.json")))
        self.summary = self.commands / "step_summary_certify"
        self.summary.touch()
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        docker = bin_dir / "docker"
        docker.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                          f"{shlex.quote(str(ROOT / 'tests/github/fake_docker.py'))} \"$@\"\n")
        docker.chmod(0o755)
        self.record = tmp / "docker-run.json"
        (tmp / "home").mkdir()
        self.env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(tmp),
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(self.workspace),
            "GITHUB_API_URL": api_url,
            "GITHUB_SERVER_URL": "https://github.com",
            "GITHUB_REPOSITORY": "Codertocat/Hello-World",
            "GITHUB_SHA": "f" * 40,
            "GITHUB_REF": "refs/pull/2/merge",
            "GITHUB_EVENT_NAME": "pull_request",
            "GITHUB_EVENT_PATH": str(event),
            "GITHUB_RUN_ID": "77",
            "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_STEP_SUMMARY": str(self.summary),
            "RUNNER_TEMP": str(temp),
            "FAKE_DOCKER_RECORD": str(self.record),
            "FAKE_DOCKER_HOME": str(tmp / "home"),
            "FAKE_DOCKER_CERTIFY": shlex.join([sys.executable, str(FAKE_CERTIFIER),
                                               "--scenario", scenario]),
        }
        self.inputs = {name: str(spec.get("default", ""))
                       for name, spec in ACTION["inputs"].items()}
        self.inputs.update(with_)
        self.steps: dict[str, StepResult] = {}

    def expand(self, text: str) -> str:
        def value(match: re.Match[str]) -> str:
            expr = match.group(1)
            if expr == "github.token":
                return TOKEN
            kind, _, rest = expr.partition(".")
            if kind == "inputs":
                return self.expand(self.inputs[rest])
            if kind == "steps":
                step_id, _, output = rest.partition(".outputs.")
                result = self.steps.get(step_id)
                return "" if result is None else result.outputs.get(output, "")
            raise AssertionError(f"unsupported expression {expr}")

        return EXPRESSION.sub(value, text)

    def run(self, step: dict[str, Any]) -> StepResult:
        output = self.commands / f"set_output_{step.get('id', 'step')}"
        output.write_text("")
        env = {**self.env, "GITHUB_OUTPUT": str(output)}
        env.update({k: self.expand(str(v)) for k, v in step.get("env", {}).items()})
        cwd = self.expand(step.get("working-directory", str(self.workspace)))
        proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=cwd, env=env,
                              capture_output=True, text=True)
        result = StepResult(proc.returncode, parse_outputs(output.read_text()),
                            proc.stdout + proc.stderr)
        if "id" in step:
            self.steps[step["id"]] = result
        return result

    def run_job(self) -> dict[str, StepResult]:
        results = {}
        for step in ACTION["runs"]["steps"]:
            if "run" not in step:  # actions/upload-artifact: not run here
                continue
            condition = step.get("if", "")
            failed = any(r.returncode for r in results.values())
            if failed and "always()" not in condition:
                continue
            results[step.get("id") or step["name"]] = self.run(step)
        return results

    @property
    def docker_run(self) -> dict[str, Any]:
        return json.loads(self.record.read_text())


def test_pass_runs_the_image_on_gpus_with_mounts_user_and_inputs_by_name(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "pass", baseline="models/base",
                    subject="models/int8", profile="dev")
    results = runner.run_job()
    certify = results["certify"]
    assert certify.returncode == 0, certify.stdout
    assert certify.outputs["exit-code"] == "0"
    assert certify.outputs["verdict"] == "PASS"
    assert results["Gate"].returncode == 0

    run = runner.docker_run
    assert run["image"] == "ghcr.io/invarlock/invarlock:0.1.0"
    assert run["options"]["--gpus"] == ["all"]
    assert "--ipc=host" in run["flags"] and "--rm" in run["flags"]
    assert run["options"]["--user"] == [f"{os.getuid()}:{os.getgid()}"]
    mounts = run["options"]["--volume"]
    for folder in (runner.workspace, runner.commands, Path(runner.env["GITHUB_EVENT_PATH"]).parent):
        assert f"{folder}:{folder}" in mounts
    assert "INPUT_GITHUB_TOKEN" in run["options"]["--env"]
    assert TOKEN not in json.dumps(run)  # the token travels by name, not on the command line
    report = Path(results["prepare"].outputs["report-dir"])
    assert report == runner.workspace / "invarlock-report"
    assert (report / "evaluation.cert.json").stat().st_uid == os.getuid()
    assert standin.calls() == ["checks/create -> 201", "checks/update -> 200",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]


def test_fail_fails_the_job_and_gpus_none_leaves_the_flag_out(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "fail", gpus="none")
    results = runner.run_job()
    assert results["certify"].returncode == 0  # the step records the exit code ...
    assert results["certify"].outputs["exit-code"] == "1"
    assert results["Gate"].returncode == 1  # ... and the last step fails the job
    assert "--gpus" not in runner.docker_run["options"]
    assert standin.check_runs[min(standin.check_runs)]["conclusion"] == "failure"


def test_fail_on_gate_false_makes_the_gate_advisory(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "fail", **{"fail-on-gate": "false"})
    results = runner.run_job()
    assert results["Gate"].returncode == 0
    assert "::warning title=InvarLock::FAIL, advisory only" in results["Gate"].stdout


@pytest.mark.parametrize("gate", ["true", "false"])
def test_a_certifier_error_always_fails_the_job(tmp_path, standin, gate):
    runner = Runner(tmp_path, standin.url, "error2", **{"fail-on-gate": gate})
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "2"
    assert results["Gate"].returncode == 1
    assert standin.check_runs[min(standin.check_runs)]["conclusion"] == "neutral"


def test_working_directory_outside_the_workspace_is_refused(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "pass", **{"working-directory": "../.."})
    results = runner.run_job()
    assert results["prepare"].returncode == 1
    assert "working-directory must be inside the workspace" in results["prepare"].stdout
    assert "certify" not in results
    assert results["Gate"].returncode == 1
    assert standin.log == []


def test_publish_mode_needs_no_gpu(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "pass", mode="publish", certificate="report")
    runner.run(next(s for s in ACTION["runs"]["steps"] if s.get("id") == "prepare"))
    runner.run(next(s for s in ACTION["runs"]["steps"] if s.get("id") == "certify"))
    assert "--gpus" not in runner.docker_run["options"]


def test_the_docker_stand_in_refuses_paths_that_are_not_mounted(tmp_path, monkeypatch, capsys):
    """So the mount checks above can fail: the event folder left out is caught."""
    from tests.github import fake_docker

    event = tmp_path / "events" / "event.json"
    monkeypatch.setenv("FAKE_DOCKER_RECORD", str(tmp_path / "record.json"))
    monkeypatch.setenv("FAKE_DOCKER_HOME", str(tmp_path))
    monkeypatch.setenv("FAKE_DOCKER_CERTIFY", "true")
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(event))
    code = fake_docker.main(["run", "--rm", "--workdir", str(tmp_path / "work"), "--volume",
                             f"{tmp_path / 'work'}:{tmp_path / 'work'}", "--env",
                             "GITHUB_EVENT_PATH", "image"])
    assert code == 125
    assert f"{event} is not mounted" in capsys.readouterr().err
