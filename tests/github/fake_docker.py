"""A `docker` stand-in for running action.yml's steps on a machine without a Docker engine.

It accepts the `docker run` the certify step builds, records it (FAKE_DOCKER_RECORD), checks
that every path the entrypoint uses is mounted at the same path, and then does what the image
does: runs the entrypoint in the working directory with only the forwarded variables.
FAKE_DOCKER_CERTIFY names the certify command "inside the image".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WITH_VALUE = {"--user", "--workdir", "--volume", "--env", "--gpus"}
FLAGS = {"--rm", "--ipc=host"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "run":
        print(f"fake docker: only `docker run` is supported, not {argv[:1]}", file=sys.stderr)
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
    Path(os.environ["FAKE_DOCKER_RECORD"]).write_text(json.dumps({
        "argv": argv, "flags": flags, "options": options, "image": image, "command": command,
    }))

    env = {"PATH": os.environ["PATH"], "HOME": os.environ["FAKE_DOCKER_HOME"],
           "PYTHONPATH": str(ROOT),
           "INVARLOCK_CERTIFY_COMMAND": os.environ["FAKE_DOCKER_CERTIFY"]}
    for item in options.get("--env", []):
        name, sep, value = item.partition("=")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    workdir = options["--workdir"][0]
    for path in (workdir, env.get("GITHUB_OUTPUT"), env.get("GITHUB_STEP_SUMMARY"),
                 env.get("GITHUB_EVENT_PATH")):
        if path and not any(_inside(path, v[0]) and v[0] == v[1] for v in volumes):
            print(f"fake docker: {path} is not mounted at the same path", file=sys.stderr)
            return 125
    return subprocess.run([sys.executable, str(ROOT / "entrypoint"), *command], cwd=workdir,
                          env=env).returncode


def _inside(path: str, folder: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
