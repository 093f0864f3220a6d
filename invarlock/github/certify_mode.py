"""Certify mode: open the check run, run the certifier on the trusted reference, and record
the result for the artifact (`invarlock-action.json`, the HTML report); or, when nothing this
check certifies changed, report "no model change" as a success so a required check is never
left waiting. Cancellation is honoured before the certifier starts and while it runs.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from typing import TextIO

from invarlock.github import reference
from invarlock.github.artifact import write_html, write_result
from invarlock.github.certifier import (
    Cancellation,
    certify_arguments,
    child_environment,
    run_certifier,
)
from invarlock.github.commands import WorkflowCommands
from invarlock.github.event import RecordedTarget
from invarlock.github.http import GitHubClient
from invarlock.github.lifecycle import Progress, publishing, record_state
from invarlock.github.outcome import EXIT_INTERNAL, EXIT_PASS, Outcome
from invarlock.github.outputs import write_outputs
from invarlock.github.publish import Publisher
from invarlock.github.settings import Settings
from invarlock.github.targets import target_of_this_run

log = logging.getLogger("invarlock.github")


def no_change(settings: Settings, client: GitHubClient | None, commands: WorkflowCommands,
              progress: Progress) -> int:
    """Nothing this check certifies changed: report that as a `success`, so that a required
    check is reported on every pull request instead of waiting forever."""
    commands.notice("No model change: nothing to certify (input relevant is false).",
                    title="InvarLock")
    publisher = Publisher(settings, client, commands,
                          target_of_this_run(settings, client, commands))
    progress.publisher = publisher
    published = publisher.finish_no_change()
    if settings.github.output_path is not None:
        write_outputs(settings.github.output_path,
                      {"verdict": "", "exit-code": "0", "skipped": "true", "error": "",
                       "check-run-url": (published.check_url or "") if published else "",
                       "check-run-id": (published.check_id or "") if published else ""})
    return EXIT_PASS


def certify(settings: Settings, client: GitHubClient | None, commands: WorkflowCommands,
            environ: Mapping[str, str], stderr: TextIO, cancellation: Cancellation,
            progress: Progress) -> tuple[Outcome, Publisher]:
    """Open the check run, then certify (unless cancelled first or the reference refused);
    the outcome is recorded in the report folder for the artifact and for publish mode."""
    target = target_of_this_run(settings, client, commands)
    publisher = Publisher(settings, client, commands, target)
    progress.publisher = publisher
    publishing(commands, "start", publisher.start)
    record_state(settings, publisher)
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
