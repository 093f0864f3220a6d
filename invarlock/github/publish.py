"""Publishing to GitHub: the check run and the sticky comment, with the API client injected.

Publishing never changes the verdict or the exit code. Every failure becomes a `::warning::`
that says what was skipped and why; a read-only token (pull requests from forks, Dependabot)
is expected and explained, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from invarlock.errors import InvarlockError
from invarlock.github import render
from invarlock.github.checks import CheckOutput, CheckRun, CheckRuns, CheckSpec
from invarlock.github.commands import WorkflowCommands
from invarlock.github.comments import BODY_LIMIT, StickyComment, marker
from invarlock.github.event import RecordedTarget, Target
from invarlock.github.http import GitHubClient, GitHubError, NotFound, PermissionDenied
from invarlock.github.outcome import Outcome
from invarlock.github.settings import Settings

log = logging.getLogger(__name__)

FORK_HINT = ("pull requests from forks get a read-only token; report them from a workflow_run "
             "workflow with `mode: publish` (see the Action's documentation, \"Fork pull "
             "requests\")")
PERMISSIONS_HINT = "the job needs `permissions: checks: write, pull-requests: write`"


@dataclass(frozen=True)
class Published:
    check_url: str | None = None
    comment_url: str | None = None


class Publisher:
    """Reports one outcome for one target. `client` is None when nothing may be sent."""

    def __init__(self, settings: Settings, client: GitHubClient | None,
                 commands: WorkflowCommands, target: Target | None) -> None:
        self._settings = settings
        self._client = client
        self._commands = commands
        self._target = target
        self._run: CheckRun | None = None
        self._checks_refused = False
        if client is not None and target is not None:
            try:
                owner, repo = settings.github.owner_and_name
            except InvarlockError as exc:
                commands.warning(f"Nothing to publish to: {exc}",
                                 title="InvarLock: not published")
                self._client = None
                return
            self._checks = CheckRuns(client, owner, repo)
            self._owner, self._repo = owner, repo

    @property
    def active(self) -> bool:
        return self._client is not None and self._target is not None

    def start(self) -> None:
        """Show the check as running while the certifier works."""
        if not (self.active and self._settings.check_run):
            return
        with self._reporting_failures("create the check run", checks=True):
            self._run = self._checks.start(self._spec())

    def finish(self, outcome: Outcome) -> Published:
        if not self.active:
            return Published()
        assert self._target is not None
        links = render.Links(run_url=self._target.run_url,
                             artifact_name=self._settings.artifact_name,
                             head_sha=self._target.head_sha)
        report = render.Report(self._settings.check_name, outcome, links)
        check_url = self._complete_check(report)
        if check_url:
            report = replace(report, links=replace(links, check_url=check_url))
        return Published(check_url, self._update_comment(report))

    def _complete_check(self, report: render.Report) -> str | None:
        if not self._settings.check_run or self._checks_refused:
            return None
        output = render.check_output(report)
        fallback = CheckOutput(output.title, render.short_report(report))
        with self._reporting_failures("complete the check run", checks=True):
            run = self._checks.complete(self._spec(), self._run,
                                        str(report.outcome.conclusion), output, fallback)
            return run.html_url
        return None

    def _update_comment(self, report: render.Report) -> str | None:
        assert self._target is not None and self._client is not None
        if not self._settings.comment:
            return None
        number = self._target.pull_request
        if number is None:
            log.info("no pull request for this run: no comment")
            return None
        line = marker(self._settings.check_name)
        body = render.comment(report, BODY_LIMIT - len(line) - 1)
        sticky = StickyComment(self._client, self._owner, self._repo, number, line)
        with self._reporting_failures(f"update the comment on pull request #{number}"):
            return sticky.upsert(body, render.short_report(report)).html_url
        return None

    def _spec(self) -> CheckSpec:
        assert self._target is not None
        github = self._settings.github
        external_id = f"invarlock:{github.run_id or 'local'}:{github.run_attempt}"
        return CheckSpec(self._settings.check_name, self._target.head_sha, external_id,
                         self._target.run_url)

    @contextmanager
    def _reporting_failures(self, what: str, *, checks: bool = False) -> Iterator[None]:
        try:
            yield
        except PermissionDenied as exc:
            if checks:
                self._checks_refused = True
            fork = self._target is not None and self._target.fork
            if exc.read_only:
                hint = FORK_HINT if fork else f"the token is read-only; {PERMISSIONS_HINT}"
            else:
                hint = PERMISSIONS_HINT
            self._commands.warning(f"Could not {what}: {exc}. {hint[0].upper()}{hint[1:]}.",
                                   title="InvarLock: not published")
        except GitHubError as exc:
            self._commands.warning(f"Could not {what}: {exc}", title="InvarLock: not published")


def verified_pull_request(client: GitHubClient, owner: str, repo: str,
                          recorded: RecordedTarget | None, head_sha: str,
                          commands: WorkflowCommands) -> int | None:
    """The pull request a certifying run recorded, if GitHub confirms its head is `head_sha`.

    The record comes from an artifact the pull request's own workflow wrote, so it is only
    trusted after the API says that pull request really is at the certified commit.
    """
    if recorded is None or recorded.pull_request is None:
        return None
    number = recorded.pull_request
    if recorded.head_sha != head_sha:
        commands.warning(f"The report names pull request #{number} at {recorded.head_sha[:12]}, "
                         f"not the certified commit {head_sha[:12]}; no comment.")
        return None
    try:
        pr = client.get(f"/repos/{owner}/{repo}/pulls/{number}")
    except NotFound:
        commands.warning(f"Pull request #{number} named by the report does not exist; no "
                         "comment.")
        return None
    except GitHubError as exc:
        commands.warning(f"Could not check pull request #{number}: {exc}; no comment.")
        return None
    if (pr.get("head") or {}).get("sha") != head_sha:
        commands.warning(f"Pull request #{number} has moved on from {head_sha[:12]}; no comment "
                         "(the run for its new head reports there).")
        return None
    return number
