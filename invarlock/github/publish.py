"""Publishing to GitHub: the check run and the sticky comment, with the API client injected.

Publishing never changes the verdict or the exit code. Every failure becomes a `::warning::`
that says what was skipped and why; a read-only token (pull requests from forks, Dependabot)
is expected and explained, not an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from invarlock import untrusted
from invarlock.enums import Verdict
from invarlock.errors import InvarlockError
from invarlock.github import render
from invarlock.github.artifact import HTML_FILENAME
from invarlock.github.checks import Annotation, CheckOutput, CheckRun, CheckRuns, CheckSpec
from invarlock.github.commands import WorkflowCommands
from invarlock.github.comments import BODY_LIMIT, StickyComment, marker, token_login
from invarlock.github.event import RecordedTarget, Target, is_repository_path
from invarlock.github.http import GitHubClient, GitHubError, NotFound, PermissionDenied
from invarlock.github.outcome import Conclusion, Outcome
from invarlock.github.settings import CommentMode, Settings

log = logging.getLogger(__name__)

FORK_HINT = ("pull requests from forks get a read-only token; report them from a workflow_run "
             "workflow with `mode: publish` (see the Action's documentation, \"Fork pull "
             "requests\")")
PERMISSIONS_HINT = "the job needs `permissions: checks: write, pull-requests: write`"


@dataclass(frozen=True)
class Published:
    check_url: str | None = None
    comment_url: str | None = None
    check_id: str | None = None


class Publisher:
    """Reports one outcome for one target. `client` is None when nothing may be sent."""

    def __init__(self, settings: Settings, client: GitHubClient | None,
                 commands: WorkflowCommands, target: Target | None, *,
                 recorded_files: tuple[str, ...] | None = None) -> None:
        self._settings = settings
        self._client = client
        self._commands = commands
        self._target = target
        self._recorded_files = recorded_files
        self._run: CheckRun | None = None
        self._checks_refused = False
        self.check_completed = False  # the check run (if any) is no longer in progress
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
    def target(self) -> Target | None:
        return self._target

    @property
    def active(self) -> bool:
        return self._client is not None and self._target is not None

    def start(self) -> None:
        """Show the check as running while the certifier works."""
        if not (self.active and self._settings.check_run):
            return
        with self._reporting_failures("create the check run", checks=True):
            self._run = self._checks.start(self._spec())

    @property
    def open_check_api_url(self) -> str | None:
        """The API address of the check run started and not yet completed."""
        if self._run is None or self.check_completed or self._client is None:
            return None
        return f"{self._client.api_url}/repos/{self._owner}/{self._repo}/check-runs/{self._run.id}"

    def annotation_files(self) -> tuple[str, ...]:
        """Repository paths of the files a FAIL concerns: subject (or edit config), presets."""
        if self._recorded_files is not None:
            return self._recorded_files
        return annotation_files(self._settings)

    def comment_text(self, body: str) -> str | None:
        """Write `body` as the sticky comment (aggregate mode); its URL, or None."""
        if not (self.active and self._settings.comment):
            return None
        assert self._target is not None
        number = self._target.pull_request
        if number is None:
            log.info("no pull request for this run: no comment")
            return None
        head_sha = self._target.head_sha
        line = marker(self._settings.check_name, aggregate=True, head_sha=head_sha)
        with self._reporting_failures(f"update the comment on pull request #{number}"):
            # A superseded run (its pull request has a newer head) must not overwrite the
            # comment of the run for that newer head.
            current = self._pull_request_head(number)
            if current != head_sha:
                self._commands.notice(f"Pull request #{number} has moved on from "
                                      f"{head_sha[:12]}; the comment is left to the run for "
                                      "its new head.", title="InvarLock: comment not written")
                return None
            sticky = StickyComment(self._client, self._owner, self._repo, number, line,
                                   self._author())
            return sticky.upsert(body[:BODY_LIMIT - len(line) - 1], body[:2000]).html_url
        return None

    def _pull_request_head(self, number: int) -> str:
        assert self._client is not None
        pr = self._client.get(f"/repos/{self._owner}/{self._repo}/pulls/{number}")
        head = pr.get("head") if isinstance(pr, dict) else None
        sha = head.get("sha") if isinstance(head, dict) else None
        return sha if isinstance(sha, str) else ""

    def finish_failed(self, outcome: Outcome) -> Published | None:
        """Complete the check run as `failure` with the reason, rendered as plainly as can be.

        The last resort when the run could not reach (or publish) a verdict through the full
        report: it depends on no certificate and no renderer.
        """
        if not (self.active and self._settings.check_run) or self._checks_refused:
            return None
        assert self._target is not None
        reason = untrusted.plain(outcome.error or "no verdict", 1000)
        return self._complete_plain(
            Conclusion.FAILURE, f"Could not certify (exit {outcome.exit_code}): {reason}",
            f"### ⚠️ {untrusted.markdown(self._settings.check_name)}: could not certify\n\n"
            + untrusted.markdown(reason, 1000))

    def finish_no_change(self) -> Published | None:
        """`success`: nothing this check certifies changed, so there was nothing to certify."""
        return self._complete_plain(
            Conclusion.SUCCESS, "No model change: nothing to certify",
            f"### {untrusted.markdown(self._settings.check_name)}: no model change\n\nNothing "
            "this check certifies changed in this commit (the workflow set `relevant: "
            "false`), so nothing was certified.")

    def _complete_plain(self, conclusion: Conclusion, title: str,
                        summary: str) -> Published | None:
        if not (self.active and self._settings.check_run) or self._checks_refused:
            return None
        assert self._target is not None
        if self._target.run_url:
            summary += f"\n\n[workflow run]({self._target.run_url})"
        output = CheckOutput(title, summary)
        with self._reporting_failures("complete the check run", checks=True):
            run = self._checks.complete(self._spec(), self._run, str(conclusion), output,
                                        output)
            self.check_completed = True
            return Published(run.html_url, None, str(run.id))
        return None

    def finish(self, outcome: Outcome) -> Published:
        if not self.active:
            return Published()
        assert self._target is not None
        links = render.Links(run_url=self._target.run_url,
                             artifact_name=self._settings.artifact_name,
                             head_sha=self._target.head_sha,
                             html_report=HTML_FILENAME if outcome.certificate else None)
        report = render.Report(self._settings.check_name, outcome, links)
        check = self._complete_check(report)
        check_url = check.html_url if check is not None else None
        if check_url:
            report = replace(report, links=replace(links, check_url=check_url))
        return Published(check_url, self._update_comment(report),
                         str(check.id) if check is not None else None)

    def _complete_check(self, report: render.Report) -> CheckRun | None:
        if not self._settings.check_run or self._checks_refused:
            return None
        output = render.check_output(report)
        fallback = CheckOutput(output.title, render.short_report(report))
        conclusion = report.outcome.conclusion(self._settings.fail_conclusion)
        annotations = fail_annotations(report.outcome, self.annotation_files())
        with self._reporting_failures("complete the check run", checks=True):
            run = self._checks.complete(self._spec(), self._run, str(conclusion), output,
                                        fallback, annotations)
            self.check_completed = True
            return run
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
        mode = self._settings.comment_mode
        with self._reporting_failures(f"update the comment on pull request #{number}"):
            sticky = StickyComment(self._client, self._owner, self._repo, number, line,
                                   self._author())
            if mode is not CommentMode.ALWAYS:
                existing = sticky.find()
                passed = report.outcome.conclusion() is Conclusion.SUCCESS
                if existing is None and mode is CommentMode.ON_FAILURE and passed:
                    log.info("comment-mode on-failure: a PASS writes no new comment")
                    return None
                if existing is not None and mode is CommentMode.ON_CHANGE \
                        and _headline(existing.body) == _headline(f"{line}\n{body}"):
                    log.info("comment-mode on-change: the verdict line is unchanged")
                    return existing.html_url
            return sticky.upsert(body, render.short_report(report)).html_url
        return None

    def _author(self) -> str:
        assert self._client is not None
        return self._settings.comment_author or token_login(self._client)

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


def _headline(body: str) -> str:
    """The verdict line of a comment (its first heading): what `on-change` compares."""
    return next((line for line in body.splitlines() if line.startswith("### ")), "")


def annotation_files(settings: Settings) -> tuple[str, ...]:
    """Files of the repository the certification read, as paths from its root.

    The subject's `config.json` (else its weights index or weights file), or the edit config
    when the subject is built from the baseline; then the presets. Paths outside the
    repository (models mounted from elsewhere) cannot carry annotations and are left out.
    """
    root = settings.repository_root
    if root is None:
        return ()
    inputs = settings.certify
    candidates: list[Path] = []
    if inputs.subject:
        candidates.append(_subject_file(Path(inputs.subject)))
    elif inputs.edit_config:
        candidates.append(Path(inputs.edit_config))
    candidates += [Path(p) for p in inputs.presets]
    found: list[str] = []
    real_root = Path(os.path.realpath(root))
    for path in candidates:
        real = Path(os.path.realpath(path))
        if real.is_relative_to(real_root) and real.is_file():
            relative = real.relative_to(real_root).as_posix()
            if is_repository_path(relative) and relative not in found:
                found.append(relative)
    return tuple(found)


def _subject_file(subject: Path) -> Path:
    if not subject.is_dir():
        return subject
    for name in ("config.json", "model.safetensors.index.json", "model.safetensors"):
        if (subject / name).is_file():
            return subject / name
    weights = sorted([*subject.glob("*.safetensors"), *subject.glob("*.gguf")])
    return weights[0] if weights else subject / "config.json"


def fail_annotations(outcome: Outcome, files: tuple[str, ...]) -> list[Annotation]:
    """On FAIL, each reason on the subject's file; the presets named as what judged it."""
    cert = outcome.certificate
    if outcome.verdict is not Verdict.FAIL or cert is None or not files:
        return []
    reasons = [str(r) for r in cert["verdict"].get("reasons") or []] or ["FAIL"]
    subject, presets = files[0], files[1:]
    annotations = [Annotation(subject, reason, "InvarLock FAIL") for reason in reasons]
    policy = cert.get("policy") or {}
    for preset in presets:
        annotations.append(Annotation(
            preset, f"This preset is part of the configuration the FAIL was judged with "
                    f"({policy.get('tier', '?')} tier, {policy.get('profile', '?')} profile).",
            "InvarLock FAIL: configuration", level="notice"))
    return annotations
