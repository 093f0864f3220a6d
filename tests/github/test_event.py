"""Event targets from real webhook payloads (octokit/webhooks examples)."""

from __future__ import annotations

import json

import pytest

from invarlock.errors import InputError
from invarlock.github.event import (
    RecordedTarget,
    load_event,
    target_for_run,
    target_for_workflow_run,
)
from tests.github.conftest import WEBHOOKS, payload

MERGE_SHA = "f" * 40
RUN_URL = "https://github.com/Codertocat/Hello-World/actions/runs/1"


@pytest.mark.parametrize("name", ["pull_request__opened.payload.json",
                                  "pull_request__synchronize.payload.json",
                                  "pull_request__opened.with-null-body.json"])
def test_pull_request_targets_the_head_commit_not_the_merge_commit(name):
    event = payload(name)
    target = target_for_run("pull_request", event, sha=MERGE_SHA, run_url=RUN_URL)
    assert target.head_sha == event["pull_request"]["head"]["sha"] != MERGE_SHA
    assert target.pull_request == event["number"] == 2
    assert target.run_url == RUN_URL
    assert target.fork is False


def test_pull_request_target_event_reads_the_same_payload():
    event = payload("pull_request__synchronize.payload.json")
    target = target_for_run("pull_request_target", event, sha=MERGE_SHA, run_url=None)
    assert target.head_sha == "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def test_a_pull_request_from_another_repository_is_a_fork():
    event = payload("pull_request__opened.payload.json")
    event["pull_request"]["head"]["repo"]["full_name"] = "someone/Hello-World"
    assert target_for_run("pull_request", event, sha=MERGE_SHA, run_url=None).fork
    event["pull_request"]["head"]["repo"] = None  # the fork was deleted
    assert target_for_run("pull_request", event, sha=MERGE_SHA, run_url=None).fork


@pytest.mark.parametrize("name", ["push__with-new-branch.payload.json", "push__payload.json"])
def test_push_targets_github_sha_without_a_pull_request(name):
    target = target_for_run("push", payload(name), sha="1" * 40, run_url=RUN_URL)
    assert target.head_sha == "1" * 40
    assert target.pull_request is None


def test_other_events_need_github_sha():
    assert target_for_run("workflow_dispatch", {}, sha="2" * 40, run_url=None).head_sha == "2" * 40
    with pytest.raises(InputError, match="GITHUB_SHA is missing"):
        target_for_run("workflow_dispatch", {}, sha="", run_url=None)


def test_workflow_run_targets_the_certified_commit_and_its_pull_request():
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    run = event["workflow_run"]
    target = target_for_workflow_run(event)
    assert target.head_sha == run["head_sha"] == "3484a3fb816e0859fd6e1cea078d76385ff50625"
    assert target.pull_request == run["pull_requests"][0]["number"] == 2
    assert target.run_url == run["html_url"]


def test_workflow_run_prefers_the_pull_request_at_the_certified_commit():
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    run = event["workflow_run"]
    other = json.loads(json.dumps(run["pull_requests"][0]))
    other["number"], other["head"]["sha"] = 7, run["head_sha"]
    run["pull_requests"].append(other)
    assert target_for_workflow_run(event).pull_request == 7


def test_workflow_run_from_a_fork_lists_no_pull_request():
    event = payload("workflow_run__completed.with-pull-requests.payload.json")
    event["workflow_run"]["pull_requests"] = []
    assert target_for_workflow_run(event).pull_request is None


def test_publish_mode_needs_a_workflow_run_payload():
    with pytest.raises(InputError, match="publish mode needs a workflow_run event"):
        target_for_workflow_run(payload("push__payload.json"))


def test_load_event_errors_are_input_errors(tmp_path):
    assert load_event(None) == {}
    assert load_event(WEBHOOKS / "push__payload.json")["ref"] == "refs/tags/simple-tag"
    with pytest.raises(InputError, match="missing file"):
        load_event(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        load_event(tmp_path / "bad.json")


def test_recorded_target_round_trip_and_rejects_junk():
    rec = RecordedTarget("pull_request", "a" * 40, 5, RUN_URL)
    assert RecordedTarget.from_dict(rec.as_dict()) == rec
    assert RecordedTarget.from_dict({"head_sha": "a", "pull_request": "5"}) is None
    assert RecordedTarget.from_dict(["x"]) is None
