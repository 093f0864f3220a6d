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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.github.conftest import FAKE_CERTIFIER, ROOT, TOKEN, parse_outputs, payload
from tests.github.standin import Fault, Hold
from tests.github.test_action_files import load_yaml

ACTION = load_yaml(ROOT / "action.yml")
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# How long a step or a rendezvous may take before the test calls it a hang: generous, as a
# loaded machine starts interpreters slowly; nothing waits this long when all goes well.
HANG = 600


@dataclass
class StepResult:
    returncode: int
    outputs: dict[str, str]
    stdout: str


class Runner:
    """Runs action.yml's steps for one job, like the Actions runner (without Docker)."""

    def __init__(self, tmp: Path, api_url: str, scenario: str, *,
                 workspace: Path | None = None, **with_: str) -> None:
        self.tmp = tmp
        self.workspace = workspace or tmp / "work" / "repo" / "repo"
        self.workspace.mkdir(parents=True, exist_ok=True)
        temp = tmp / "work" / "_temp"
        (temp / "_github_workflow").mkdir(parents=True)
        self.commands = temp / "_runner_file_commands"
        self.commands.mkdir()
        self.event = temp / "_github_workflow" / "event.json"
        self.event.write_text(json.dumps(payload("pull_request__synchronize.payload.json")))
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
        (tmp / "tool-cache").mkdir()
        self.env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(tmp),
            "PYTHONPATH": str(ROOT),
            "GITHUB_ACTIONS": "true",
            "GITHUB_ACTION_PATH": str(ROOT),
            "GITHUB_WORKSPACE": str(self.workspace),
            "GITHUB_API_URL": api_url,
            "GITHUB_SERVER_URL": "https://github.com",
            "GITHUB_REPOSITORY": "Codertocat/Hello-World",
            "GITHUB_SHA": "f" * 40,
            "GITHUB_REF": "refs/pull/2/merge",
            "GITHUB_EVENT_NAME": "pull_request",
            "GITHUB_EVENT_PATH": str(self.event),
            "GITHUB_RUN_ID": "77",
            "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_STEP_SUMMARY": str(self.summary),
            "RUNNER_TEMP": str(temp),
            "RUNNER_TOOL_CACHE": str(tmp / "tool-cache"),
            "FAKE_DOCKER_RECORD": str(self.record),
            "FAKE_DOCKER_HOME": str(tmp / "home"),
            "FAKE_DOCKER_CERTIFY": shlex.join([sys.executable, str(FAKE_CERTIFIER),
                                               "--scenario", scenario, "--record",
                                               str(tmp / "certifier-calls.jsonl")]),
        }
        self.inputs = {name: str(spec.get("default", ""))
                       for name, spec in ACTION["inputs"].items()}
        self.inputs.update(with_)
        self.steps: dict[str, StepResult] = {}
        self.cancelled = False

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

    def condition(self, text: str, failed: bool) -> bool:
        """GitHub's `if:` for the forms action.yml uses: status functions, ==, != and &&."""
        if not text:
            return not failed and not self.cancelled
        terms = [t.strip() for t in text.split("&&")]
        status_given = any(t.lstrip("!") in ("always()", "cancelled()", "success()",
                                             "failure()") for t in terms)
        result = True if status_given else (not failed and not self.cancelled)
        for term in terms:
            if term == "always()":
                continue
            if term == "cancelled()":
                result = result and self.cancelled
            elif term == "!cancelled()":
                result = result and not self.cancelled
            else:
                left, op, right = re.fullmatch(r"(\S+) (==|!=) '(.*)'", term).groups()
                actual = self.expand("${{ " + left + " }}")
                result = result and ((actual == right) == (op == "=="))
        return result

    def start(self, step: dict[str, Any]) -> tuple[subprocess.Popen[str], Path]:
        output = self.commands / f"set_output_{step.get('id', 'step')}"
        output.write_text("")
        env = {**self.env, "GITHUB_OUTPUT": str(output)}
        env.update({k: self.expand(str(v)) for k, v in step.get("env", {}).items()})
        cwd = self.expand(step.get("working-directory", str(self.workspace)))
        # SIGINT at its default, as a runner starts a step: bash cannot trap a signal it was
        # started with ignored, which is how a shell's background job (`pytest … &`) has it
        proc = subprocess.Popen(["bash", "-e", "-c", step["run"]], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_default_sigint)
        return proc, output

    def finish(self, step: dict[str, Any], proc: subprocess.Popen[str],
               output: Path) -> StepResult:
        stdout, _ = proc.communicate(timeout=HANG)
        result = StepResult(proc.returncode, parse_outputs(output.read_text()), stdout)
        if "id" in step:
            self.steps[step["id"]] = result
        return result

    def run(self, step: dict[str, Any]) -> StepResult:
        return self.finish(step, *self.start(step))

    def run_job(self, *, cancel_during: str | None = None, when: Any = None,
                cancel: Any = None) -> dict[str, StepResult]:
        """Run every step; with `cancel_during`, cancel the job (SIGINT to that step, as the
        runner does) once `when()` is true, then go on as GitHub does after a cancel.
        `cancel(proc)` replaces the waiting and the signal (the boundary tests' own)."""
        results: dict[str, StepResult] = {}
        for step in ACTION["runs"]["steps"]:
            if "run" not in step:  # actions/upload-artifact: not run here
                continue
            failed = any(r.returncode for r in results.values())
            if not self.condition(step.get("if", ""), failed):
                continue
            key = step.get("id") or step["name"]
            if key == cancel_during and cancel is not None:
                proc, output = self.start(step)
                cancel(proc)
                self.cancelled = True
                results[key] = self.finish(step, proc, output)
            elif key == cancel_during:
                proc, output = self.start(step)
                deadline = time.monotonic() + 60
                while not when() and time.monotonic() < deadline:
                    time.sleep(0.05)
                proc.send_signal(signal.SIGINT)
                self.cancelled = True
                results[key] = self.finish(step, proc, output)
            else:
                results[key] = self.run(step)
        return results

    @property
    def docker_run(self) -> dict[str, Any]:
        return json.loads(self.record.read_text())

    @property
    def docker_stops(self) -> list[list[str]]:
        path = Path(str(self.record) + ".stop")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
            else []

    def certifier_argv(self) -> list[str]:
        lines = (self.tmp / "certifier-calls.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["argv"]


def test_pass_runs_the_image_on_gpus_with_mounts_user_and_inputs_by_name(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "pass", baseline="models/base",
                    subject="models/int8", profile="dev")
    results = runner.run_job()
    certify = results["certify"]
    assert certify.returncode == 0, certify.stdout
    assert certify.outputs["exit-code"] == "0"
    assert certify.outputs["verdict"] == "PASS"
    assert certify.outputs["baseline-cache-key"].startswith("invarlock-baseline-")
    assert results["Gate"].returncode == 0

    run = runner.docker_run
    assert run["image"] == ACTION["inputs"]["image"]["default"]
    argv = run["argv"]
    container = results["prepare"].outputs["container"]
    assert re.fullmatch(r"invarlock-77-1-[a-z0-9]{8}", container)
    # the exact head of the command line: named per run, an init process, shared memory
    assert argv[:8] == ["run", "--rm", "--init", "--name", container, "--shm-size", "2g",
                        "--user"]
    assert "--ipc=host" not in argv
    assert run["options"]["--gpus"] == ["all"] and run["gpus"] == {"count": -1}
    assert run["options"]["--user"] == [f"{os.getuid()}:{os.getgid()}"]
    mounts = run["options"]["--volume"]
    for folder in (runner.workspace, runner.commands, runner.event.parent):
        assert f"{folder}:{folder}" in mounts
    # the token reaches the container in a 0600 file, neither in its environment (what
    # `docker inspect` shows other jobs on the host) nor on the command line
    assert "INPUT_GITHUB_TOKEN" not in run["options"]["--env"]
    assert "INPUT_GITHUB_TOKEN" not in run["container_env"]
    assert TOKEN not in json.dumps(run)
    token_file = Path(run["container_env"]["INVARLOCK_TOKEN_FILE"])
    assert token_file.parent == Path(results["prepare"].outputs["state-dir"])
    assert run["token_file_mode"] == "0o600"
    assert not token_file.exists()  # removed once the container exited
    assert standin.log[0].status == 201  # ... and the entrypoint did read it
    # offline, with a cache of this job's own in runner.temp (nothing shared to plant in)
    cache = tmp_path / "work" / "_temp" / "invarlock-cache"
    assert f"{cache}:{cache}" in mounts
    env = run["options"]["--env"]
    assert f"INVARLOCK_CACHE_DIR={cache}/results" in env and f"HF_HOME={cache}/huggingface" in env
    assert "HF_HUB_OFFLINE=1" in env and "INVARLOCK_ALLOW_NETWORK=1" not in env
    # GPUs given and no device: CUDA is required (the certifier stops with exit 3 without it)
    assert "--device=cuda" in runner.certifier_argv()
    report = Path(results["prepare"].outputs["report-dir"])
    assert report == runner.workspace / "invarlock-report"
    assert (report / "evaluation.cert.json").stat().st_uid == os.getuid()
    assert (report / "evaluation.cert.html").is_file()
    assert standin.calls() == ["checks/create -> 201", "checks/update -> 200",
                               "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]
    assert not (Path(results["prepare"].outputs["state-dir"]) / "check-run").exists()


@pytest.mark.parametrize(("gpus", "passed", "parsed"), [
    ("all", "all", {"count": -1}),
    ("2", "2", {"count": 2}),
    ("device=0,1", '"device=0,1"', {"device_ids": ["0", "1"]}),
    ('"device=1"', '"device=1"', {"device_ids": ["1"]}),
    ("device=GPU-3a9f", '"device=GPU-3a9f"', {"device_ids": ["GPU-3a9f"]}),
])
def test_gpus_follow_dockers_grammar_and_reach_docker_quoted(tmp_path, standin, gpus, passed,
                                                             parsed):
    runner = Runner(tmp_path, standin.url, "pass", gpus=gpus, comment="false")
    results = runner.run_job()
    assert results["Gate"].returncode == 0, results["certify"].stdout
    assert runner.docker_run["options"]["--gpus"] == [passed]
    assert runner.docker_run["gpus"] == parsed


def test_the_docker_stand_in_reads_an_unquoted_device_list_as_docker_does():
    """Why the quoting matters: Docker reads `device=0,1` as device 0 plus a count."""
    from tests.github.fake_docker import parse_gpus

    with pytest.raises(ValueError, match="both Count and DeviceIDs"):
        parse_gpus("device=0,1")
    assert parse_gpus('"device=0,1"') == {"device_ids": ["0", "1"]}


@pytest.mark.parametrize(("inputs", "message"), [
    ({"gpus": "device=0;rm"}, "gpus must be all, a count"),
    ({"gpus": "0"}, "gpus must be all, a count"),
    ({"shm-size": "lots"}, "shm-size must be a size"),
    ({"name": "a b"}, "name must be letters"),
    ({"working-directory": "../.."}, "working-directory must be inside the workspace"),
])
def test_bad_container_inputs_are_a_red_check_not_a_missing_one(tmp_path, standin, inputs,
                                                                 message):
    """Caught before docker gets the bad value, reported as a failed check with its line."""
    runner = Runner(tmp_path, standin.url, "pass", **inputs)
    results = runner.run_job()
    assert message in results["prepare"].stdout
    assert results["certify"].outputs["exit-code"] == "2"
    assert not (tmp_path / "certifier-calls.jsonl").exists()  # nothing certified
    assert "device=0;rm" not in json.dumps(runner.docker_run["argv"])
    (run,) = standin.check_runs.values()
    assert (run["status"], run["conclusion"]) == ("completed", "failure")
    assert message in run["output"]["title"]
    assert results["Gate"].returncode == 1


def test_fail_fails_the_job_and_gpus_none_leaves_the_flag_out(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "fail", gpus="none", **{"shm-size": "512m"})
    results = runner.run_job()
    assert results["certify"].returncode == 0  # the step records the exit code ...
    assert results["certify"].outputs["exit-code"] == "1"
    assert results["Gate"].returncode == 1  # ... and the last step fails the job
    assert "--gpus" not in runner.docker_run["options"]
    assert runner.docker_run["options"]["--shm-size"] == ["512m"]
    assert not any(a.startswith("--device") for a in runner.certifier_argv())
    assert standin.check_runs[min(standin.check_runs)]["conclusion"] == "failure"


def test_fail_on_gate_false_passes_the_job_but_the_check_still_fails(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "fail", **{"fail-on-gate": "false"})
    results = runner.run_job()
    assert results["Gate"].returncode == 0
    assert "::warning title=InvarLock::FAIL, advisory only" in results["Gate"].stdout
    assert standin.check_runs[min(standin.check_runs)]["conclusion"] == "failure"


def test_a_softer_conclusion_for_a_fail_is_an_explicit_choice(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "fail", **{"fail-on-gate": "false",
                                                     "fail-conclusion": "neutral"})
    runner.run_job()
    assert standin.check_runs[min(standin.check_runs)]["conclusion"] == "neutral"


@pytest.mark.parametrize("scenario", ["error2", "error3", "crash", "silent"])
@pytest.mark.parametrize("gate", ["true", "false"])
def test_every_outcome_but_pass_fails_the_check_and_the_job(tmp_path, standin, scenario, gate):
    """Bad input, no evidence, a crash (out of memory) and a missing report: `failure`, never
    `neutral`, which branch protection would count as passing."""
    runner = Runner(tmp_path, standin.url, scenario, **{"fail-on-gate": gate})
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] in {"2", "3"}
    assert results["Gate"].returncode == 1
    (run,) = standin.check_runs.values()
    assert (run["status"], run["conclusion"]) == ("completed", "failure")
    assert standin.comments[2][0]["body"].count("could not certify") == 1


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_killed_container_leaves_no_check_run_in_progress(tmp_path, standin, cancelled):
    """SIGKILL (the out-of-memory killer, `docker kill`) gives the entrypoint no chance; the
    `if: always()` step completes the check run it left open."""
    runner = Runner(tmp_path, standin.url, "hang")
    runner.env["FAKE_DOCKER_KILL_AFTER"] = "3"
    results = {}
    for step in ACTION["runs"]["steps"]:
        if "run" in step and runner.condition(step.get("if", ""), False):
            results[step.get("id") or step["name"]] = runner.run(step)
        if step.get("id") == "certify":
            runner.cancelled = cancelled  # the job was cancelled while the container died
    assert results["certify"].outputs["exit-code"] == "137"
    (run,) = standin.check_runs.values()
    expected = "cancelled" if cancelled else "failure"
    assert (run["status"], run["conclusion"]) == ("completed", expected)
    assert standin.calls()[-1] == "checks/update -> 200"
    cleanup = [r.stdout for k, r in results.items() if k.startswith("Close")]
    assert len(cleanup) == 1 and TOKEN not in cleanup[0]
    assert results["Gate"].returncode == 1


def test_cancelling_the_job_stops_the_container_and_concludes_cancelled(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "hang")

    def running() -> bool:
        return any(r["status"] == "in_progress" for r in standin.check_runs.values()) and \
            (tmp_path / "certifier-calls.jsonl").exists()

    results = runner.run_job(cancel_during="certify", when=running)
    container = results["prepare"].outputs["container"]
    assert runner.docker_stops and runner.docker_stops[0][-1] == container
    (run,) = standin.check_runs.values()
    assert (run["status"], run["conclusion"]) == ("completed", "cancelled")
    assert results["certify"].outputs["exit-code"] == "143"  # 128 + SIGTERM
    assert "Close a check run left in progress (cancelled)" in results
    assert "Close a check run left in progress" not in results
    assert results["Gate"].returncode == 1


def test_a_symlinked_work_folder_is_mounted_under_both_names(tmp_path, standin):
    real = tmp_path / "disk" / "work"
    real.mkdir(parents=True)
    (tmp_path / "runner").mkdir()
    (tmp_path / "runner" / "_work").symlink_to(real)
    workspace = tmp_path / "runner" / "_work" / "repo"
    runner = Runner(tmp_path, standin.url, "pass", workspace=workspace,
                    **{"working-directory": "sub"})
    (workspace / "sub").mkdir()
    results = runner.run_job()
    assert results["Gate"].returncode == 0, results["certify"].stdout
    mounts = runner.docker_run["options"]["--volume"]
    resolved = real / "repo"
    assert f"{resolved}:{resolved}" in mounts and f"{resolved}:{workspace}" in mounts
    assert runner.docker_run["options"]["--workdir"] == [str(resolved / "sub")]
    assert (resolved / "sub" / "invarlock-report" / "evaluation.cert.json").is_file()


def test_allow_network_and_a_named_cache_folder(tmp_path, standin):
    cache = tmp_path / "models-cache"
    secret = "a-cache-secret-forks-cannot-read"
    runner = Runner(tmp_path, standin.url, "pass", **{"allow-network": "true",
                                                     "cache-dir": str(cache),
                                                     "cache-secret": secret})
    note = ('printf "%s %s" "$(stat -c %a "$INVARLOCK_CACHE_SECRET_FILE")" '
            f'"$(cat "$INVARLOCK_CACHE_SECRET_FILE")" > {shlex.quote(str(tmp_path / "seen"))}'
            '; exec "$@"')
    runner.env["FAKE_DOCKER_CERTIFY"] = shlex.join(
        ["sh", "-c", note, "sh", *shlex.split(runner.env["FAKE_DOCKER_CERTIFY"])])
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "0", results["certify"].stdout
    env = runner.docker_run["options"]["--env"]
    assert "INVARLOCK_ALLOW_NETWORK=1" in env and "HF_HUB_OFFLINE=1" not in env
    assert f"{cache}:{cache}" in runner.docker_run["options"]["--volume"]
    assert cache.is_dir()
    # the secret reaches the certifier as a 0600 file named in the environment, never as a
    # value (the certify command inside the "image" noted what it found)
    state = Path(results["prepare"].outputs["state-dir"])
    assert f"INVARLOCK_CACHE_SECRET_FILE={state}/cache-secret" in env
    assert secret not in json.dumps(runner.docker_run)
    assert (tmp_path / "seen").read_text() == f"600 {secret}"
    assert not (state / "cache-secret").exists()  # removed once the container ended


def test_a_named_cache_folder_without_a_secret_is_refused(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "pass", **{"cache-dir": str(tmp_path / "shared")})
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "2"
    assert "set input 'cache-secret'" in results["certify"].stdout
    assert not (tmp_path / "certifier-calls.jsonl").exists()
    assert results["Gate"].returncode == 1


def test_a_matrix_subject_name_suffixes_check_and_artifact(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "pass", name="int4", comment="false")
    results = runner.run_job()
    assert results["prepare"].outputs["artifact-name"] == "invarlock-certificate-int4"
    assert results["certify"].outputs["artifact-name"] == "invarlock-certificate-int4"
    (run,) = standin.check_runs.values()
    assert run["name"] == "InvarLock (int4)"
    report = Path(results["certify"].outputs["report-dir"])
    assert json.loads((report / "invarlock-action.json").read_text())["name"] == "int4"


def test_the_docker_stand_in_refuses_paths_that_are_not_mounted(tmp_path, monkeypatch, capsys):
    """So the mount checks above can fail: the event folder left out is caught, and a
    symlinked spelling of a mounted folder is not the mount target."""
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
    assert f"{event} is not under a mount target" in capsys.readouterr().err
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.delenv("GITHUB_EVENT_PATH")
    code = fake_docker.main(["run", "--rm", "--workdir", str(tmp_path / "link"), "--volume",
                             f"{tmp_path / 'real'}:{tmp_path / 'real'}", "image"])
    assert code == 125


def test_the_gate_never_logs_pass_without_a_pass(tmp_path, standin):
    """Exit code 0 with no PASS verdict (a certifier that exits 0 and prints nothing is
    caught by the entrypoint; here the Gate itself is given the bare 0)."""
    runner = Runner(tmp_path, standin.url, "pass")
    gate = next(s for s in ACTION["runs"]["steps"] if s.get("name") == "Gate")
    runner.steps["certify"] = StepResult(0, {"exit-code": "0", "verdict": ""}, "")
    result = runner.run(gate)
    assert result.returncode == 1 and "PASS" not in result.stdout.replace(
        "without a PASS verdict", "")
    runner.steps["certify"] = StepResult(0, {"exit-code": "4", "verdict": ""}, "")
    result = runner.run(gate)
    assert result.returncode == 1 and "internal error" in result.stdout


def test_proxy_and_ca_variables_reach_the_container_and_the_bundle_is_mounted(tmp_path,
                                                                              standin):
    bundle = tmp_path / "corp-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    runner = Runner(tmp_path, standin.url, "pass", comment="false")
    proxies = {"HTTP_PROXY": "http://proxy:3128", "HTTPS_PROXY": "http://proxy:3128",
               "NO_PROXY": "127.0.0.1,localhost", "http_proxy": "http://proxy:3128",
               "https_proxy": "http://proxy:3128", "no_proxy": "127.0.0.1,localhost",
               "SSL_CERT_FILE": str(bundle), "REQUESTS_CA_BUNDLE": str(bundle)}
    runner.env.update(proxies)
    results = runner.run_job()
    assert results["Gate"].returncode == 0, results["certify"].stdout
    run = runner.docker_run
    for name, value in proxies.items():
        assert run["container_env"][name] == value, name
        assert value not in run["argv"]  # by name only
    assert f"{bundle}:{bundle}:ro" in run["options"]["--volume"]


def test_no_model_change_is_a_success_without_the_image(tmp_path, standin):
    runner = Runner(tmp_path, standin.url, "pass", relevant="false",
                    **{"reporter-python": sys.executable})
    results = runner.run_job()
    assert not runner.record.exists()  # no docker, no image, no GPU
    assert results["Gate"].returncode == 0 and "no model change" in results["Gate"].stdout
    assert results["certify"].outputs["verdict"] == ""  # nothing was certified
    (run,) = standin.check_runs.values()
    assert (run["name"], run["conclusion"]) == ("InvarLock", "success")
    assert run["output"]["title"] == "No model change: nothing to certify"


# ----------------------------------------------------------------------------- the cancel race
# The job can be cancelled at any moment of the certify step. Each boundary below is reached
# on purpose (the fake docker waits on a FIFO, the stand-in holds a request), the job is
# cancelled there, and only then does the step go on: no timing decides what is tested.


def _rendezvous(path: Path, mode: str) -> Any:
    """Open a FIFO (blocking until the other side opens it), failing instead of hanging."""
    import threading

    opened: list[Any] = []
    thread = threading.Thread(target=lambda: opened.append(open(path, mode)),  # noqa: SIM115
                              daemon=True)
    thread.start()
    thread.join(HANG)
    if not opened:  # unblock the thread, then fail
        with open(path, "r" if mode == "w" else "w"):
            pass
        thread.join(5)
        raise AssertionError(f"nobody opened {path}")
    return opened[0]


def _cancel_at_docker(runner: Runner):
    def cancel(proc: subprocess.Popen[str]) -> None:
        pause = _rendezvous(Path(f"{runner.record}.pause"), "w")  # docker is at the boundary
        proc.send_signal(signal.SIGINT)  # the runner cancels the job
        stopped = _rendezvous(Path(f"{runner.record}.stopped"), "r")
        stopped.read()  # the trap has run `docker stop`
        stopped.close()
        Path(f"{runner.record}.stopped").unlink()
        pause.close()  # docker goes on from the boundary
    return cancel


def _cancel_at_request(runner: Runner, hold: Hold):
    def cancel(proc: subprocess.Popen[str]) -> None:
        assert hold.arrived.wait(HANG), "the request never came"
        proc.send_signal(signal.SIGINT)
        stopped = _rendezvous(Path(f"{runner.record}.stopped"), "r")
        stopped.read()  # SIGTERM has been sent to the entrypoint
        stopped.close()
        Path(f"{runner.record}.stopped").unlink()
        hold.release.set()
    return cancel


@pytest.mark.parametrize("boundary", ["before-create", "created", "started"])
def test_a_cancel_before_the_entrypoint_runs_stops_it_without_certifying(tmp_path, standin,
                                                                         boundary):
    """The hang: a cancel before docker has created the container found nothing to stop,
    and the container then ran to its end ("exited with 0 but printed no verdict")."""
    runner = Runner(tmp_path, standin.url, "hang")
    runner.env["FAKE_DOCKER_PAUSE_AT"] = boundary
    os.mkfifo(f"{runner.record}.pause")
    os.mkfifo(f"{runner.record}.stopped")
    results = runner.run_job(cancel_during="certify", cancel=_cancel_at_docker(runner))
    assert results["certify"].outputs["exit-code"] == "143"
    assert not (tmp_path / "certifier-calls.jsonl").exists()  # never started
    for run in standin.check_runs.values():  # none left open; none but `cancelled`
        assert (run["status"], run["conclusion"]) == ("completed", "cancelled")
    if boundary != "started":  # there the signal may also end the process before Python
        (run,) = standin.check_runs.values()
    assert results["Gate"].returncode == 1


def test_a_cancel_while_the_check_run_is_created_concludes_cancelled(tmp_path, standin):
    hold = Hold()
    standin.inject("checks/create", Fault(hold=hold))
    runner = Runner(tmp_path, standin.url, "hang")
    os.mkfifo(f"{runner.record}.stopped")
    results = runner.run_job(cancel_during="certify", cancel=_cancel_at_request(runner, hold))
    assert results["certify"].outputs["exit-code"] == "143"
    assert not (tmp_path / "certifier-calls.jsonl").exists()
    (run,) = standin.check_runs.values()
    assert (run["status"], run["conclusion"]) == ("completed", "cancelled")


def test_a_cancel_while_the_verdict_is_published_keeps_the_verdict(tmp_path, standin):
    """The verdict is out in seconds: a cancel then must not leave the check open or turn
    a reached PASS into a crash."""
    hold = Hold()
    standin.inject("checks/update", Fault(hold=hold))
    runner = Runner(tmp_path, standin.url, "pass", comment="false")
    os.mkfifo(f"{runner.record}.stopped")
    results = runner.run_job(cancel_during="certify", cancel=_cancel_at_request(runner, hold))
    assert results["certify"].outputs["exit-code"] == "0"
    (run,) = standin.check_runs.values()
    assert (run["status"], run["conclusion"]) == ("completed", "success")
