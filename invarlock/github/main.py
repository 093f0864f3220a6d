"""The Action entrypoint: read settings, certify (or load results), report, exit.

Modes:
- certify: run the certifier, report its outcome on this run's commit and pull request;
- publish: report a downloaded report folder from a `workflow_run` workflow (fork pull
  requests), only when it verifies and binds to the run's head commit;
- aggregate: one comment with a row per subject for the report folders of a matrix.

The exit code is the certifier's: 0 PASS, 1 FAIL, 2 bad input, 3 no evidence (128 + signal
when cancelled), and 4 for a defect of the Action itself. Publishing happens after the
outputs and the job summary are written; a publishing defect fails the check closed.

The modes live in their own modules: certify_mode (the certifier), downloaded (publish and
aggregate), lifecycle (completing the report and the check run) and targets (which commit and
pull request); this module reads the settings, dispatches, and fails closed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from invarlock.errors import InvarlockError
from invarlock.github.certifier import Cancellation
from invarlock.github.certify_mode import certify, no_change
from invarlock.github.commands import WorkflowCommands
from invarlock.github.downloaded import (
    aggregate_reports,
    load_for_publishing,
    publish_many,
    report_folders,
)
from invarlock.github.http import GitHubClient, RetryPolicy
from invarlock.github.lifecycle import Progress, clear_state, report
from invarlock.github.outcome import EXIT_INTERNAL, Outcome
from invarlock.github.outputs import write_outputs
from invarlock.github.publish import Publisher
from invarlock.github.settings import (
    Mode,
    Settings,
    fallback_settings,
    input_variables,
    read_settings,
    read_token,
)
from invarlock.github.targets import fallback_target

log = logging.getLogger("invarlock.github")


def main() -> int:
    return run(os.environ, stdout=sys.stdout, stderr=sys.stderr)


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
    progress = Progress()
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
         stderr: TextIO, policy: RetryPolicy | None, progress: Progress) -> int:
    client = None
    if settings.token and settings.publishes:
        client = GitHubClient(settings.github.api_url, settings.token, policy=policy)
    elif settings.publishes:
        commands.warning("No github-token: the check run and the comment are skipped.",
                         title="InvarLock: not published")

    if settings.mode is Mode.AGGREGATE:
        return aggregate_reports(settings, client, commands)
    if settings.mode is Mode.CERTIFY and not settings.relevant:
        return no_change(settings, client, commands, progress)
    if settings.mode is Mode.PUBLISH:
        assert settings.certificate is not None
        folders = report_folders(settings.certificate)
        if folders:
            return publish_many(settings, environ, client, commands, folders, progress)
        outcome, publisher = load_for_publishing(settings, client, commands)
        progress.publisher = publisher
        return report(settings, commands, outcome, publisher)
    # A cancel that comes while the verdict is being published is recorded, not obeyed: the
    # verdict is out in seconds, well within docker's stop grace period.
    cancellation = Cancellation(settings.cancel_file)
    with cancellation.installed():
        outcome, publisher = certify(settings, client, commands, environ, stderr,
                                     cancellation, progress)
        return report(settings, commands, outcome, publisher)


def _internal_error(environ: Mapping[str, str], commands: WorkflowCommands, exc: Exception,
                    policy: RetryPolicy | None, progress: Progress) -> int:
    log.debug("internal error", exc_info=True)
    message = f"internal error: {type(exc).__name__}: {exc}"
    commands.error(message, title="InvarLock: internal error")
    _fail_closed(environ, commands, Outcome.failed(EXIT_INTERNAL, message), policy, progress)
    return EXIT_INTERNAL


def _fail_closed(environ: Mapping[str, str], commands: WorkflowCommands, outcome: Outcome,
                 policy: RetryPolicy | None, progress: Progress) -> None:
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
            publisher = Publisher(settings, client, commands, fallback_target(settings))
        if publisher.check_completed:
            return
        published = publisher.finish_failed(outcome)
        if publisher.check_completed:
            clear_state(settings)
        if published is not None and settings.github.output_path is not None:
            write_outputs(settings.github.output_path,
                          {"check-run-url": published.check_url or "",
                           "check-run-id": published.check_id or ""})
    except Exception as exc:  # nothing left to fall back on but the log and the exit code
        log.debug("publishing the failure failed", exc_info=True)
        commands.warning(f"Could not publish the failure: {type(exc).__name__}: {exc}",
                         title="InvarLock: not published")


def _configure_logging(stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("invarlock-action: %(levelname)s: %(message)s"))
    root = logging.getLogger("invarlock")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
