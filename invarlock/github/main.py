"""The Action entrypoint: read settings, certify (or load results), report, exit.

Modes:
- certify: run the certifier, report its outcome on this run's commit and pull request;
- publish: report a downloaded report folder from a `workflow_run` workflow (fork pull
  requests), only when it verifies and binds to the run's head commit;
- aggregate: one comment with a row per subject for the report folders of a matrix.

The exit code is the certifier's: 0 PASS, 1 FAIL, 2 bad input, 3 no evidence (128 + signal
when cancelled). Publishing happens after the outputs and the job summary are written and
can only add warnings.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TextIO, TypeVar

from invarlock import atomic
from invarlock.errors import InvarlockError
from invarlock.github import aggregate, reference, render
from invarlock.github.artifact import bind_report, load_report, write_html, write_result
from invarlock.github.certifier import (
    Cancellation,
    certify_arguments,
    child_environment,
    run_certifier,
)
from invarlock.github.commands import WorkflowCommands
from invarlock.github.event import (
    RecordedTarget,
    Target,
    load_event,
    target_for_run,
    target_for_workflow_run,
)
from invarlock.github.http import GitHubClient, RetryPolicy
from invarlock.github.outcome import EXIT_EVIDENCE, Outcome
from invarlock.github.outputs import write_outputs
from invarlock.github.publish import Publisher, verified_pull_request
from invarlock.github.settings import Mode, Settings, input_variables, read_settings
from invarlock.github.summary import append_summary

log = logging.getLogger("invarlock.github")
T = TypeVar("T")


def main() -> int:
    return run(os.environ, stdout=sys.stdout, stderr=sys.stderr)


def run(environ: Mapping[str, str], *, stdout: TextIO, stderr: TextIO,
        policy: RetryPolicy | None = None) -> int:
    """One Action run; `environ` is the only input (tests pass their own)."""
    _configure_logging(stderr)
    commands = WorkflowCommands(stdout, in_actions=environ.get("GITHUB_ACTIONS") == "true")
    tokens = {environ.get(v, "").strip()
              for v in (*input_variables("github-token"), "GITHUB_TOKEN")}
    for token in sorted(tokens):
        commands.add_mask(token)  # first, whatever comes next
    try:
        settings = read_settings(environ)
    except InvarlockError as exc:
        commands.error(str(exc), title="InvarLock: bad input")
        return exc.exit_code
    client = None
    if settings.token and settings.publishes:
        client = GitHubClient(settings.github.api_url, settings.token, policy=policy)
    elif settings.publishes:
        commands.warning("No github-token: the check run and the comment are skipped.",
                         title="InvarLock: not published")

    if settings.mode is Mode.AGGREGATE:
        return _aggregate(settings, client, commands)
    if settings.mode is Mode.PUBLISH:
        outcome, publisher = _load_for_publishing(settings, client, commands)
    else:
        outcome, publisher = _certify(settings, client, commands, environ, stderr)

    _announce(commands, outcome)
    _write_runner_files(settings, outcome)
    published = _publishing(commands, "complete", lambda: publisher.finish(outcome))
    if publisher.check_completed:
        _clear_state(settings)
    if published is not None and settings.github.output_path is not None:
        write_outputs(settings.github.output_path,
                      {"check-run-url": published.check_url or "",
                       "comment-url": published.comment_url or ""})
    return outcome.exit_code


def _publishing(commands: WorkflowCommands, stage: str, action: Callable[[], T]) -> T | None:
    """Run a publishing stage; a defect in it must not change the verdict or stop the run.

    (API failures are already warnings inside the Publisher; this catches the unexpected.)
    """
    try:
        return action()
    except Exception as exc:
        log.debug("publishing (%s) failed", stage, exc_info=True)
        commands.warning(f"Publishing failed ({stage}): {type(exc).__name__}: {exc}",
                         title="InvarLock: not published")
        return None


def _certify(settings: Settings, client: GitHubClient | None, commands: WorkflowCommands,
             environ: Mapping[str, str], stderr: TextIO) -> tuple[Outcome, Publisher]:
    target = _target_of_this_run(settings, commands)
    publisher = Publisher(settings, client, commands, target)
    cancellation = Cancellation()
    with cancellation.installed():
        _publishing(commands, "start", publisher.start)
        _record_state(settings, publisher)
        out_dir = settings.output_dir
        prepared = reference.prepare(settings, target)
        arguments = [*certify_arguments(prepared.inputs, out_dir), *prepared.arguments]
        log.info("running %s", " ".join([*settings.certify_command, *arguments]))
        with commands.group("invarlock certify"), commands.stop_commands():
            try:
                outcome = prepared.refusal or run_certifier(
                    settings.certify_command, arguments,
                    env=child_environment(environ, settings.token), log_stream=stderr,
                    on_start=cancellation.watch)
            except Exception as exc:  # the reporter must still report
                log.debug("running the certifier failed", exc_info=True)
                outcome = Outcome.failed(EXIT_EVIDENCE, f"internal error: {type(exc).__name__}: "
                                                        f"{exc}")
    if cancellation.signal_number is not None:
        outcome = Outcome.stopped(cancellation.signal_number)
    recorded = None if target is None else RecordedTarget(
        settings.github.event_name, target.head_sha, target.pull_request, target.run_url,
        publisher.annotation_files())
    try:
        write_result(out_dir, outcome, recorded, settings.name)
        write_html(outcome)
    except OSError as exc:
        commands.warning(f"Could not write the result files into {out_dir}: {exc}")
    return outcome, publisher


def _target_of_this_run(settings: Settings, commands: WorkflowCommands) -> Target | None:
    """The commit and pull request of this run: published to now, or recorded for later."""
    github = settings.github
    try:
        payload = load_event(github.event_path)
        return target_for_run(github.event_name, payload, sha=github.sha,
                              run_url=github.run_url)
    except InvarlockError as exc:
        if settings.publishes:
            commands.warning(f"Nothing to publish to: {exc}", title="InvarLock: not published")
        return None


def _load_for_publishing(settings: Settings, client: GitHubClient | None,
                         commands: WorkflowCommands) -> tuple[Outcome, Publisher]:
    """The downloaded report, reported only as what it proves (publish mode).

    The report comes from a workflow run the pull request's author controls. It is published
    with its verdict only when the certificate verifies (schema, digest, every number and the
    verdict recomputed) and the commit it records is the `workflow_run` head commit; anything
    else is published as a failure that says why.
    """
    assert settings.certificate is not None
    try:
        target = target_for_workflow_run(load_event(settings.github.event_path))
    except InvarlockError as exc:
        commands.error(str(exc), title="InvarLock: cannot publish")
        return Outcome.failed(exc.exit_code, str(exc)), Publisher(settings, None, commands, None)
    try:
        outcome, recorded = load_report(settings.certificate)
        outcome = bind_report(outcome, recorded, target.head_sha)
    except InvarlockError as exc:  # published as a failure: the evidence is unusable
        outcome, recorded = Outcome.failed(EXIT_EVIDENCE, str(exc)), None
    if recorded is not None and recorded.head_sha != target.head_sha:
        recorded = None  # nothing it says about pull requests or files is trusted
    if target.pull_request is None and client is not None and settings.comment:
        try:
            owner, repo = settings.github.owner_and_name
        except InvarlockError:
            pass  # the publisher warns that there is nothing to publish to
        else:
            number = verified_pull_request(client, owner, repo, recorded, target.head_sha,
                                           commands)
            target = replace(target, pull_request=number)
    files = recorded.files if recorded is not None else ()
    return outcome, Publisher(settings, client, commands, target, recorded_files=files)


def _aggregate(settings: Settings, client: GitHubClient | None,
               commands: WorkflowCommands) -> int:
    """One comment with a row per subject (mode `aggregate`, after a matrix)."""
    assert settings.certificate is not None
    try:
        rows = aggregate.load_rows(settings.certificate)
    except InvarlockError as exc:
        commands.error(str(exc), title="InvarLock: cannot aggregate")
        return exc.exit_code
    github = settings.github
    body = aggregate.render_comment(settings.check_name, rows, run_url=github.run_url)
    if github.summary_path is not None:
        append_summary(github.summary_path, body, run_url=github.run_url)
    code = aggregate.exit_code(rows)
    if github.output_path is not None:
        write_outputs(github.output_path, {"exit-code": str(code)})
    target = _target_of_this_run(settings, commands)
    publisher = Publisher(settings, client, commands, target)
    url = _publishing(commands, "comment", lambda: publisher.comment_text(body))
    if url and github.output_path is not None:
        write_outputs(github.output_path, {"comment-url": url})
    return code


def _record_state(settings: Settings, publisher: Publisher) -> None:
    """Record the open check run for the Action's cleanup step (`if: always()`)."""
    url = publisher.open_check_api_url
    if settings.state_file is None or url is None:
        return
    try:
        atomic.write_text(settings.state_file, url + "\n")
    except OSError as exc:
        log.warning("could not record the check run for cleanup: %s", exc)


def _clear_state(settings: Settings) -> None:
    if settings.state_file is not None:
        Path(settings.state_file).unlink(missing_ok=True)


def _announce(commands: WorkflowCommands, outcome: Outcome) -> None:
    report = render.Report("InvarLock", outcome, render.Links())
    line = render.title(report)
    if outcome.verdict is None:
        commands.error(outcome.error or line, title="InvarLock: could not certify")
    elif outcome.exit_code == 0:
        commands.notice(line, title="InvarLock")
    else:
        commands.error(line, title="InvarLock")


def _write_runner_files(settings: Settings, outcome: Outcome) -> None:
    github = settings.github
    if github.output_path is not None:
        write_outputs(github.output_path, outcome.outputs())
    if github.summary_path is not None:
        report = render.Report(settings.check_name, outcome,
                               render.Links(run_url=github.run_url,
                                            artifact_name=settings.artifact_name))
        append_summary(github.summary_path, render.job_summary(report), run_url=github.run_url)


def _configure_logging(stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("invarlock-action: %(levelname)s: %(message)s"))
    root = logging.getLogger("invarlock")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
