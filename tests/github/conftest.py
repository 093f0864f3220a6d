"""Fixtures for the Action tests: the GitHub API stand-in, real webhook payloads, synthetic
certificates and the environment a workflow step would see."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from invarlock.certificate import document
from invarlock.certificate import markdown as md
from invarlock.enums import MetricKind
from tests.certs import synthetic_certificate
from tests.github.standin import GitHubStandIn

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "github"
WEBHOOKS = DATA / "webhooks"
FAKE_CERTIFIER = Path(__file__).with_name("fake_certifier.py")
TOKEN = "ghs_TestTokenValue1234567890abcdefXYZ"


def payload(name: str) -> dict[str, Any]:
    return json.loads((WEBHOOKS / name).read_text(encoding="utf-8"))


@pytest.fixture
def standin() -> Iterator[GitHubStandIn]:
    with GitHubStandIn(tokens={TOKEN: "write", "ghs_ReadOnly": "read"}) as server:
        yield server
    assert server.problems == [], server.problems


@pytest.fixture(scope="session")
def certificates() -> dict[str, dict[str, Any]]:
    """Sealed, schema-valid certificates for each verdict shape the reports must handle."""
    return {
        "pass": synthetic_certificate(shift=0.0, seed=1),
        "fail": synthetic_certificate(shift=0.2, seed=2),
        "catastrophic": synthetic_certificate(shift=1.5, seed=3),
        "accuracy": synthetic_certificate(kind=MetricKind.ACCURACY, shift=0.0, n=64, seed=4),
    }


def write_report(folder: Path, cert: dict[str, Any]) -> Path:
    """A report folder as the certifier leaves it (certificate + Markdown)."""
    return document.write_certificate(cert, folder, md.render(cert))


@dataclass
class StepEnvironment:
    """The variables a workflow step gets, with the runner files in a temporary folder."""

    env: dict[str, str]
    root: Path

    @property
    def outputs(self) -> dict[str, str]:
        return parse_outputs(Path(self.env["GITHUB_OUTPUT"]).read_text(encoding="utf-8"))

    @property
    def summary(self) -> str:
        return Path(self.env["GITHUB_STEP_SUMMARY"]).read_text(encoding="utf-8")

    def certify_with(self, scenario: str) -> None:
        record = self.root / "certifier-calls.jsonl"
        self.env["INVARLOCK_CERTIFY_COMMAND"] = shlex.join(
            [sys.executable, str(FAKE_CERTIFIER), "--scenario", scenario,
             "--record", str(record)])

    def certifier_calls(self) -> list[dict[str, Any]]:
        path = self.root / "certifier-calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def step_environment(root: Path, api_url: str, event_name: str, event: dict[str, Any],
                     **inputs: str) -> StepEnvironment:
    temp = root / "_temp"
    (temp / "_runner_file_commands").mkdir(parents=True, exist_ok=True)
    (temp / "_github_workflow").mkdir(parents=True, exist_ok=True)
    event_path = temp / "_github_workflow" / "event.json"
    event_path.write_text(json.dumps(event), encoding="utf-8")
    output = temp / "_runner_file_commands" / "set_output"
    summary = temp / "_runner_file_commands" / "step_summary"
    output.touch()
    summary.touch()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(root),
        "GITHUB_ACTIONS": "true",
        "GITHUB_API_URL": api_url,
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": "Codertocat/Hello-World",
        "GITHUB_SHA": "f" * 40,  # the merge commit of a pull_request run: never the target
        "GITHUB_EVENT_NAME": event_name,
        "GITHUB_EVENT_PATH": str(event_path),
        "GITHUB_RUN_ID": "4242",
        "GITHUB_RUN_ATTEMPT": "1",
        "GITHUB_OUTPUT": str(output),
        "GITHUB_STEP_SUMMARY": str(summary),
        "PYTHONPATH": str(ROOT),
    }
    for name, value in inputs.items():
        env[f"INPUT_{name.upper()}"] = value
    return StepEnvironment(env, root)


def parse_outputs(text: str) -> dict[str, str]:
    """Read a GITHUB_OUTPUT file the way the runner does (both forms; later values win)."""
    out: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            value = []
            for inner in lines:
                if inner == delimiter:
                    break
                value.append(inner)
            else:
                raise AssertionError(f"unterminated output {name}")
            out[name] = "\n".join(value)
        elif "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
        elif line.strip():
            raise AssertionError(f"malformed output line {line!r}")
    return out
