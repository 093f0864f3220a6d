"""Which commit and pull request a run reports on: the event's, or the inputs `commit` and
`pr-number` in its place (a pull request named that way only while its head is that commit),
and a best-effort target for failing closed when the settings themselves could not be read.
"""

from __future__ import annotations

from dataclasses import replace

from invarlock.errors import InvarlockError
from invarlock.github.commands import WorkflowCommands
from invarlock.github.event import (
    RecordedTarget,
    Target,
    load_event,
    target_for_run,
    target_for_workflow_run,
)
from invarlock.github.http import GitHubClient
from invarlock.github.publish import verified_pull_request
from invarlock.github.settings import Mode, Settings


def target_of_this_run(settings: Settings, client: GitHubClient | None,
                       commands: WorkflowCommands) -> Target | None:
    """The commit and pull request of this run: published to now, or recorded for later.

    Inputs `commit` and `pr-number` replace what the event names (for `workflow_run` and
    other events that do not carry the pull request's head); a pull request given that way
    is commented on only while its head is that commit.
    """
    github = settings.github
    try:
        payload = load_event(github.event_path)
        target = target_for_run(github.event_name, payload, sha=github.sha,
                                run_url=github.run_url)
    except InvarlockError as exc:
        if not settings.commit:
            if settings.publishes:
                commands.warning(f"Nothing to publish to: {exc}",
                                 title="InvarLock: not published")
            return None
        target = Target(settings.commit, None, github.run_url)
    if settings.commit:
        target = replace(target, head_sha=settings.commit)
    if settings.pr_number is not None:
        target = replace(target, pull_request=pull_request_at(settings, client,
                                                              settings.pr_number,
                                                              target.head_sha, commands))
    return target


def pull_request_at(settings: Settings, client: GitHubClient | None, number: int,
                    head_sha: str, commands: WorkflowCommands) -> int | None:
    """`number` if GitHub says that pull request's head is `head_sha` (else None, warned)."""
    if client is None:
        return None
    try:
        owner, repo = settings.github.owner_and_name
    except InvarlockError:
        return None
    recorded = RecordedTarget("", head_sha, number, None)
    return verified_pull_request(client, owner, repo, recorded, head_sha, commands)


def fallback_target(settings: Settings) -> Target | None:
    github = settings.github
    try:
        payload = load_event(github.event_path)
        if settings.mode is Mode.PUBLISH:
            target = target_for_workflow_run(payload)
        else:
            target = target_for_run(github.event_name, payload, sha=github.sha,
                                    run_url=github.run_url)
    except (InvarlockError, KeyError, TypeError, ValueError):
        if not (settings.commit or github.sha):
            return None
        target = Target(settings.commit or github.sha, None, github.run_url)
    return replace(target, head_sha=settings.commit) if settings.commit else target
