"""Publish mode as the hosted runner runs it (slow): action.yml's certify step installs the
package from the action's source into a fresh venv, without the `hf` extra, and runs the
torch-free reporter on a downloaded report.

It needs a package index for numpy, scipy, ...: the one pip is configured with, or a local
mirror given as INVARLOCK_TEST_INDEX_URL (a PEP 503 `file://` index); no GPU, no image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.github.conftest import payload, write_report
from tests.github.test_action_composite import ACTION, Runner

pytestmark = pytest.mark.slow

HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def test_publish_installs_the_light_reporter_and_publishes(tmp_path, standin, certificates):
    from invarlock.github.artifact import write_result
    from invarlock.github.event import RecordedTarget
    from invarlock.github.outcome import Outcome

    downloaded = tmp_path / "download"
    path = write_report(downloaded, certificates["pass"])
    write_result(downloaded, Outcome(0, None, None, path, None),
                 RecordedTarget("pull_request", HEAD_SHA, 2, None))
    runner = Runner(tmp_path / "hosted", standin.url, "pass", mode="publish",
                    certificate=str(downloaded))
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    event["workflow_run"]["head_sha"] = HEAD_SHA
    runner.event.write_text(json.dumps(event))
    runner.env.update({"GITHUB_EVENT_NAME": "workflow_run",
                       "PATH": f"{os.path.dirname(sys.executable)}:{runner.env['PATH']}"})
    runner.env.pop("PYTHONPATH")  # the installed package, not this checkout
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT"):
        if name in os.environ:
            runner.env[name] = os.environ[name]
    if os.environ.get("INVARLOCK_TEST_INDEX_URL"):
        runner.env["PIP_INDEX_URL"] = os.environ["INVARLOCK_TEST_INDEX_URL"]
    results = runner.run_job()
    certify = results["certify"]
    assert certify.outputs["exit-code"] == "0", certify.stdout
    venv = runner.steps["prepare"].outputs["state-dir"] + "/venv/bin/python"
    listed = subprocess.run([venv, "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "invarlock" in names and "torch" not in names and "transformers" not in names
    (run,) = standin.check_runs.values()
    assert (run["head_sha"], run["conclusion"]) == (HEAD_SHA, "success")
    assert not runner.record.exists()
    assert ACTION["runs"]["using"] == "composite"
