"""A `docker` stand-in for running action.yml's steps on a machine without a Docker engine.

`docker run`: records the exact argv (FAKE_DOCKER_RECORD), parses `--gpus` the way Docker does
(a CSV list: `device=0,1` unquoted reads as device 0 and a count of 1), checks that every path
the entrypoint uses lies under a mount target (as the container would see it, without
following host symlinks), and then does what the image does: runs the entrypoint in the
working directory with only the forwarded variables. FAKE_DOCKER_CERTIFY names the certify
command "inside the image". `docker stop NAME` sends SIGTERM to that container's entrypoint
(as Docker does to PID 1 behind `--init`) and records the call; a container that is created
but not started yet is left as it is (Docker's stop is then a no-op that succeeds) and one
that does not exist yet is an error, as with Docker. FAKE_DOCKER_KILL_AFTER (seconds) kills
the container with SIGKILL (the out-of-memory killer) instead of letting it finish.

Step boundaries on purpose, without timing: FAKE_DOCKER_PAUSE_AT names one of
`before-create` (docker run called, no container yet), `created` (the container exists, its
entrypoint has not started) and `started` (the entrypoint's process runs, before Python has
read a line of it). There `docker run` opens the FIFO `<FAKE_DOCKER_RECORD>.pause` for
reading, which blocks until the test opens it for writing (the test then knows where docker
is), and reads to its end, which blocks until the test closes it. When the FIFO
`<FAKE_DOCKER_RECORD>.stopped` exists, `docker stop` opens it for writing once it has sent
its signal (or found nothing to signal), so the test can wait for the stop to have happened.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WITH_VALUE = {"--user", "--workdir", "--volume", "--env", "--gpus", "--name", "--shm-size"}
FLAGS = {"--rm", "--init"}


def main(argv: list[str]) -> int:
    if argv[:1] == ["stop"]:
        return stop(argv[1:])
    if not argv or argv[0] != "run":
        print(f"fake docker: only `docker run` and `docker stop` are supported, not {argv[:1]}",
              file=sys.stderr)
        return 125
    options: dict[str, list[str]] = {}
    flags: list[str] = []
    rest = argv[1:]
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option in FLAGS:
            flags.append(option)
        elif option in WITH_VALUE:
            options.setdefault(option, []).append(rest.pop(0))
        else:
            print(f"fake docker: unexpected option {option}", file=sys.stderr)
            return 125
    image, command = rest[0], rest[1:]
    volumes = [v.split(":") for v in options.get("--volume", [])]
    gpus = None
    if "--gpus" in options:
        try:
            gpus = parse_gpus(options["--gpus"][0])
        except ValueError as exc:
            print(f"docker: Error response from daemon: {exc}", file=sys.stderr)
            return 125
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["FAKE_DOCKER_HOME"],
           "PYTHONPATH": str(ROOT),
           "INVARLOCK_CERTIFY_COMMAND": os.environ["FAKE_DOCKER_CERTIFY"]}
    for item in options.get("--env", []):
        name, sep, value = item.partition("=")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    # What `docker inspect` would show of the container: its environment and command line.
    Path(os.environ["FAKE_DOCKER_RECORD"]).write_text(json.dumps({
        "argv": argv, "flags": flags, "options": options, "image": image, "command": command,
        "gpus": gpus, "container_env": env,
        "token_file_mode": _mode(env.get("INVARLOCK_TOKEN_FILE")),
    }))
    workdir = options["--workdir"][0]
    for path in (workdir, env.get("GITHUB_OUTPUT"), env.get("GITHUB_STEP_SUMMARY"),
                 env.get("GITHUB_EVENT_PATH"), env.get("INVARLOCK_STATE_FILE"),
                 env.get("INVARLOCK_CANCEL_FILE"), env.get("INVARLOCK_TOKEN_FILE")):
        if path and not any(_inside(path, v[1]) for v in volumes):
            print(f"fake docker: {path} is not under a mount target", file=sys.stderr)
            return 125
    name = options.get("--name", ["unnamed"])[0]
    pid_file = _pid_file(name)
    pause_at = os.environ.get("FAKE_DOCKER_PAUSE_AT", "")
    if pause_at == "before-create":
        _pause()
    pid_file.write_text(CREATED)
    if pause_at == "created":
        _pause()
    boot = [sys.executable, "-c", STARTED_BOOT, os.environ["FAKE_DOCKER_RECORD"] + ".pause"] \
        if pause_at == "started" else [sys.executable]
    proc = subprocess.Popen([*boot, str(ROOT / "entrypoint"), *command], cwd=workdir, env=env)
    pid_file.write_text(str(proc.pid))
    try:
        kill_after = float(os.environ.get("FAKE_DOCKER_KILL_AFTER", "0"))
        if kill_after:
            try:
                return proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return 137
        code = proc.wait()
        return code if code >= 0 else 128 - code
    finally:
        pid_file.unlink(missing_ok=True)


def stop(argv: list[str]) -> int:
    name = argv[-1]
    with open(os.environ["FAKE_DOCKER_RECORD"] + ".stop", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(argv) + "\n")
    pid_file = _pid_file(name)
    state = pid_file.read_text() if pid_file.is_file() else None
    if state and state != CREATED:
        os.kill(int(state), signal.SIGTERM)
    _stopped()
    if state is None:
        print(f"Error response from daemon: No such container: {name}", file=sys.stderr)
        return 1
    if state and state != CREATED:  # a created container: Docker's stop does nothing
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    print(name)
    return 0


def _stopped() -> None:
    """Tell a waiting test that the stop has been sent (when it made the FIFO)."""
    fifo = Path(os.environ["FAKE_DOCKER_RECORD"] + ".stopped")
    if fifo.exists() and stat.S_ISFIFO(fifo.stat().st_mode):
        with open(fifo, "w"):
            pass


CREATED = "created"
# The entrypoint's process, held before it runs a line of the entrypoint (argv: the FIFO,
# the entrypoint, its arguments).
STARTED_BOOT = """
import runpy, sys
fifo = sys.argv.pop(1)
with open(fifo) as fh:
    fh.read()
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _mode(path: str | None) -> str | None:
    return oct(stat.S_IMODE(os.stat(path).st_mode)) if path and os.path.exists(path) else None


def _pause() -> None:
    with open(os.environ["FAKE_DOCKER_RECORD"] + ".pause") as fh:
        fh.read()


def parse_gpus(value: str) -> dict[str, object]:
    """Docker's `--gpus` parsing (opts/gpus.go): CSV fields; a bare number is a count."""
    request: dict[str, object] = {}
    for field in next(csv.reader([value])):
        key, sep, val = field.partition("=")
        if not sep:
            request["count"] = -1 if key == "all" else int(key)
        elif key == "device":
            request["device_ids"] = val.split(",")
        elif key == "count":
            request["count"] = -1 if val == "all" else int(val)
        else:
            raise ValueError(f"unexpected key '{key}' in '{field}'")
    if "count" in request and "device_ids" in request:
        raise ValueError("cannot set both Count and DeviceIDs on device request")
    return request


def _pid_file(name: str) -> Path:
    return Path(os.environ["FAKE_DOCKER_RECORD"]).with_name(f"container-{name}.pid")


def _inside(path: str, folder: str) -> bool:
    """Lexically: the container has the mount targets, not the host's symlinks."""
    return Path(os.path.normpath(path)).is_relative_to(Path(os.path.normpath(folder)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
