"""The Action entrypoint: read settings, certify (or load results), report, exit.

Modes:
- certify: run the certifier, report its outcome on this run's commit and pull request;
- publish: report a downloaded report folder from a `workflow_run` workflow (fork pull
  requests), only when it verifies and binds to the run's head commit;
- aggregate: one comment with a row per subject for the report folders of a matrix.

The exit code is the certifier's: 0 PASS, 1 FAIL, 2 bad input, 3 no evidence (128 + signal
when cancelled), and 4 for a defect of the Action itself. Publishing happens after the
outputs and the job summary are written; a publishing defect fails the check closed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO, TypeVar

from invarlock import atomic, untrusted
from invarlock.certificate.document import CERT_FILENAME
from invarlock.errors import InvarlockError
from invarlock.github import aggregate, reference, render
from invarlock.github.artifact import (
    RESULT_FILENAME,
    bind_report,
    load_report,
    recorded_name,
    write_html,
    write_result,
)
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
from invarlock.github.outcome import EXIT_EVIDENCE, EXIT_FAIL, EXIT_INTERNAL, EXIT_PASS, Outcome
from invarlock.github.outputs import write_outputs
from invarlock.github.publish import Publisher, verified_pull_request
from invarlock.github.settings import (
    NAME_PATTERN,
    Mode,
    Settings,
    check_name_for,
    fallback_settings,
    input_variables,
    read_input,
    read_settings,
    read_token,
)
from invarlock.github.summary import append_summary

log = logging.getLogger("invarlock.github")
T = TypeVar("T")


def main() -> int:
    return run(os.environ, stdout=sys.stdout, stderr=sys.stderr)


@dataclass
class _Progress:
    """How far a run got: the publisher that may hold an open check run, for failing closed."""

    publisher: Publisher | None = None


def run(environ: Mapping[str, str], *, stdout: TextIO, stderr: TextIO,
        policy: RetryPolicy | None = None) -> int:
    """One Action run; `environ` is the only input (tests pass their own).

    Fails closed: bad input and every unexpected exception end as a `failure` check run that
    says why (exit 2 for input, EXIT_INTERNAL for the Action's own defects), never as a
    silent exit that branch protection or `fail-on-gate: false` could read as a pass.
    """
    _configure_logging(stderr)
    commands = WorkflowCommands(stdout, in_actions=environ.get("GITHUB_ACTIONS") == "true")
    tokens = {environ.get(v, "").strip()
              for v in (*input_variables("github-token"), "GITHUB_TOKEN")}
    tokens.add(read_token(environ))
    for token in sorted(tokens):
        commands.add_mask(token)  # first, whatever comes next
    progress = _Progress()
    try:
        settings = read_settings(environ)
    except InvarlockError as exc:
        commands.error(str(exc), title="InvarLock: bad input")
        _fail_closed(environ, commands, Outcome.failed(exc.exit_code, str(exc)), policy,
                     progress)
        return exc.exit_code
    except Exception as exc:
        return _internal_error(environ, commands, exc, policy, progress)
    try:
        return _run(settings, environ, commands, stderr, policy, progress)
    except Exception as exc:
        return _internal_error(environ, commands, exc, policy, progress)


def _run(settings: Settings, environ: Mapping[str, str], commands: WorkflowCommands,
         stderr: TextIO, policy: RetryPolicy | None, progress: _Progress) -> int:
    client = None
    if settings.token and settings.publishes:
        client = GitHubClient(settings.github.api_url, settings.token, policy=policy)
    elif settings.publishes:
        commands.warning("No github-token: the check run and the comment are skipped.",
                         title="InvarLock: not published")

    if settings.mode is Mode.AGGREGATE:
        return _aggregate(settings, client, commands)
    if settings.mode is Mode.CERTIFY and not settings.relevant:
        return _no_change(settings, client, commands, progress)
    if settings.mode is Mode.PUBLISH:
        assert settings.certificate is not None
        folders = _report_folders(settings.certificate)
        if folders:
            return _publish_many(settings, environ, client, commands, folders, progress)
        outcome, publisher = _load_for_publishing(settings, client, commands)
        progress.publisher = publisher
        return _report(settings, commands, outcome, publisher)
    # A cancel that comes while the verdict is being published is recorded, not obeyed: the
    # verdict is out in seconds, well within docker's stop grace period.
    cancellation = Cancellation(settings.cancel_file)
    with cancellation.installed():
        outcome, publisher = _certify(settings, client, commands, environ, stderr,
                                      cancellation, progress)
        return _report(settings, commands, outcome, publisher)


def _no_change(settings: Settings, client: GitHubClient | None, commands: WorkflowCommands,
               progress: _Progress) -> int:
    """Nothing this check certifies changed: report that as a `success`, so that a required
    check is reported on every pull request instead of waiting forever."""
    commands.notice("No model change: nothing to certify (input relevant is false).",
                    title="InvarLock")
    publisher = Publisher(settings, client, commands,
                          _target_of_this_run(settings, client, commands))
    progress.publisher = publisher
    published = publisher.finish_no_change()
    if settings.github.output_path is not None:
        write_outputs(settings.github.output_path,
                      {"verdict": "", "exit-code": "0", "skipped": "true", "error": "",
                       "check-run-url": (published.check_url or "") if published else "",
                       "check-run-id": (published.check_id or "") if published else ""})
    return EXIT_PASS


def _report(settings: Settings, commands: WorkflowCommands, outcome: Outcome,
            publisher: Publisher) -> int:
    _announce(commands, outcome)
    _write_runner_files(settings, outcome)
    published = _publishing(commands, "complete", lambda: publisher.finish(outcome))
    code = outcome.exit_code
    if publisher.active and settings.check_run and not publisher.check_completed \
            and published is None:
        # A defect while publishing: the check must not stay open or read as a pass.
        failure = Outcome.failed(EXIT_INTERNAL, "the result could not be published (an "
                                                "internal error; see the job log)")
        _publishing(commands, "failure", lambda: publisher.finish_failed(failure))
        code = code if code != EXIT_PASS else EXIT_INTERNAL
    if publisher.check_completed:
        _clear_state(settings)
    if published is not None and settings.github.output_path is not None:
        write_outputs(settings.github.output_path,
                      {"check-run-url": published.check_url or "",
                       "check-run-id": published.check_id or "",
                       "comment-url": published.comment_url or ""})
    if code != outcome.exit_code and settings.github.output_path is not None:
        write_outputs(settings.github.output_path, {"exit-code": str(code)})
    return code


def _internal_error(environ: Mapping[str, str], commands: WorkflowCommands, exc: Exception,
                    policy: RetryPolicy | None, progress: _Progress) -> int:
    log.debug("internal error", exc_info=True)
    message = f"internal error: {type(exc).__name__}: {exc}"
    commands.error(message, title="InvarLock: internal error")
    _fail_closed(environ, commands, Outcome.failed(EXIT_INTERNAL, message), policy, progress)
    return EXIT_INTERNAL


def _fail_closed(environ: Mapping[str, str], commands: WorkflowCommands, outcome: Outcome,
                 policy: RetryPolicy | None, progress: _Progress) -> None:
    """Publish `outcome` (no verdict) as a `failure` check, on the open check run if any."""
    try:
        settings = fallback_settings(environ)
        if settings.github.output_path is not None:
            write_outputs(settings.github.output_path,
                          {"verdict": "", "exit-code": str(outcome.exit_code),
                           "error": outcome.error or ""})
        publisher = progress.publisher
        if publisher is None or not publisher.active:
            if not (settings.token and settings.check_run):
                return
            client = GitHubClient(settings.github.api_url, settings.token, policy=policy)
            publisher = Publisher(settings, client, commands, _fallback_target(settings))
        if publisher.check_completed:
            return
        published = publisher.finish_failed(outcome)
        if publisher.check_completed:
            _clear_state(settings)
        if published is not None and settings.github.output_path is not None:
            write_outputs(settings.github.output_path,
                          {"check-run-url": published.check_url or "",
                           "check-run-id": published.check_id or ""})
    except Exception as exc:  # nothing left to fall back on but the log and the exit code
        log.debug("publishing the failure failed", exc_info=True)
        commands.warning(f"Could not publish the failure: {type(exc).__name__}: {exc}",
                         title="InvarLock: not published")


def _fallback_target(settings: Settings) -> Target | None:
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
             environ: Mapping[str, str], stderr: TextIO, cancellation: Cancellation,
             progress: _Progress) -> tuple[Outcome, Publisher]:
    target = _target_of_this_run(settings, client, commands)
    publisher = Publisher(settings, client, commands, target)
    progress.publisher = publisher
    _publishing(commands, "start", publisher.start)
    _record_state(settings, publisher)
    out_dir = settings.output_dir
    if cancellation.requested():  # cancelled before the container was there to be stopped
        outcome = Outcome.stopped(cancellation.signal_number or int(signal.SIGTERM))
    else:
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
                outcome = Outcome.failed(EXIT_INTERNAL, f"internal error: {type(exc).__name__}: "
                                                        f"{exc}")
    if cancellation.signal_number is not None and outcome.verdict is None:
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


def _target_of_this_run(settings: Settings, client: GitHubClient | None,
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
        target = replace(target, pull_request=_pull_request_at(settings, client,
                                                               settings.pr_number,
                                                               target.head_sha, commands))
    return target


def _pull_request_at(settings: Settings, client: GitHubClient | None, number: int,
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


def _load_for_publishing(settings: Settings, client: GitHubClient | None,
                         commands: WorkflowCommands, *,
                         find_pull_request: bool | None = None) -> tuple[Outcome, Publisher]:
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
    if find_pull_request is None:
        find_pull_request = settings.comment
    if target.pull_request is None and client is not None and find_pull_request:
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


def _report_folders(path: Path) -> list[Path]:
    """The report folders inside `path` when it holds several (actions/download-artifact
    with a `pattern` leaves one folder per artifact); empty when `path` is a report itself."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or any(
            os.path.lexists(path / n) for n in (RESULT_FILENAME, CERT_FILENAME)):
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink()
                  and any(os.path.lexists(p / n) for n in (RESULT_FILENAME, CERT_FILENAME)))


def _publish_many(settings: Settings, environ: Mapping[str, str], client: GitHubClient | None,
                  commands: WorkflowCommands, folders: list[Path], progress: _Progress) -> int:
    """Publish mode for downloaded matrix artifacts: a check run per subject, named after
    the subject the report records, and one aggregate comment when there are several."""
    base = read_input(environ, "check-name")
    rows: list[aggregate.Row] = []
    target = None
    for index, folder in enumerate(folders, 1):
        name = recorded_name(folder)
        if not NAME_PATTERN.fullmatch(name) or (not name and len(folders) > 1):
            name = f"subject-{index}"  # the record's name is untrusted text
        one = replace(settings, certificate=folder, name=name,
                      check_name=check_name_for(base, name, Mode.PUBLISH),
                      comment=settings.comment and len(folders) == 1)
        outcome, publisher = _load_for_publishing(one, client, commands,
                                                  find_pull_request=settings.comment)
        progress.publisher = publisher
        _report(one, commands, outcome, publisher)
        rows.append(aggregate.Row(name, outcome))
        target = publisher.target or target
    if len(folders) > 1 and settings.comment:
        body = aggregate.render_comment(settings.check_name, rows,
                                        run_url=target.run_url if target else None)
        publisher = Publisher(settings, client, commands, target)
        _publishing(commands, "comment", lambda: publisher.comment_text(body))
    code = aggregate.exit_code(rows)
    if settings.github.output_path is not None:
        write_outputs(settings.github.output_path, {"exit-code": str(code), "verdict": {
            EXIT_PASS: "PASS", EXIT_FAIL: "FAIL"}.get(code, "")})
    return code


def _aggregate(settings: Settings, client: GitHubClient | None,
               commands: WorkflowCommands) -> int:
    """One comment with a row per subject (mode `aggregate`, after a matrix)."""
    assert settings.certificate is not None
    github = settings.github
    try:
        rows = aggregate.load_rows(settings.certificate, expected=settings.subjects)
    except InvarlockError as exc:
        commands.error(str(exc), title="InvarLock: cannot aggregate")
        if github.output_path is not None:
            write_outputs(github.output_path, {"verdict": "", "exit-code": str(exc.exit_code),
                                               "error": str(exc)})
        return exc.exit_code
    body = aggregate.render_comment(settings.check_name, rows, run_url=github.run_url)
    if github.summary_path is not None:
        append_summary(github.summary_path, body, run_url=github.run_url)
    code = aggregate.exit_code(rows)
    if github.output_path is not None:
        verdict = {EXIT_PASS: "PASS", EXIT_FAIL: "FAIL"}.get(code, "")
        write_outputs(github.output_path, {"exit-code": str(code), "verdict": verdict})
    target = _target_of_this_run(settings, client, commands)
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
    if outcome.verdict is None:  # the error may quote the certifier or an artifact
        commands.error(untrusted.log_line(outcome.error or line, 2000),
                       title="InvarLock: could not certify")
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
