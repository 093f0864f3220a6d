"""Completing a run's report, whatever the mode: announce the result in the log, write the
step outputs and the job summary, complete the check run and the comment, and keep the state
file the Action's cleanup step reads (an open check run) in step with what was published.

A defect while publishing must neither stop the run nor change its verdict, except to fail it
closed: a check run left open by such a defect is completed as `failure`, and a PASS then
exits EXIT_INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from invarlock import atomic, untrusted
from invarlock.github import render
from invarlock.github.commands import WorkflowCommands
from invarlock.github.outcome import EXIT_INTERNAL, EXIT_PASS, Outcome
from invarlock.github.outputs import write_outputs
from invarlock.github.publish import Publisher
from invarlock.github.settings import Settings
from invarlock.github.summary import append_summary

log = logging.getLogger("invarlock.github")
T = TypeVar("T")


@dataclass
class Progress:
    """How far a run got: the publisher that may hold an open check run, for failing closed."""

    publisher: Publisher | None = None


def report(settings: Settings, commands: WorkflowCommands, outcome: Outcome,
           publisher: Publisher) -> int:
    """Report `outcome` everywhere and return the exit code (EXIT_INTERNAL for a PASS that
    could not be published)."""
    announce(commands, outcome)
    write_runner_files(settings, outcome)
    published = publishing(commands, "complete", lambda: publisher.finish(outcome))
    code = outcome.exit_code
    if publisher.active and settings.check_run and not publisher.check_completed \
            and published is None:
        # A defect while publishing: the check must not stay open or read as a pass.
        failure = Outcome.failed(EXIT_INTERNAL, "the result could not be published (an "
                                                "internal error; see the job log)")
        publishing(commands, "failure", lambda: publisher.finish_failed(failure))
        code = code if code != EXIT_PASS else EXIT_INTERNAL
    if publisher.check_completed:
        clear_state(settings)
    if published is not None and settings.github.output_path is not None:
        write_outputs(settings.github.output_path,
                      {"check-run-url": published.check_url or "",
                       "check-run-id": published.check_id or "",
                       "comment-url": published.comment_url or ""})
    if code != outcome.exit_code and settings.github.output_path is not None:
        write_outputs(settings.github.output_path, {"exit-code": str(code)})
    return code


def publishing(commands: WorkflowCommands, stage: str, action: Callable[[], T]) -> T | None:
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


def record_state(settings: Settings, publisher: Publisher) -> None:
    """Record the open check run for the Action's cleanup step (`if: always()`)."""
    url = publisher.open_check_api_url
    if settings.state_file is None or url is None:
        return
    try:
        atomic.write_text(settings.state_file, url + "\n")
    except OSError as exc:
        log.warning("could not record the check run for cleanup: %s", exc)


def clear_state(settings: Settings) -> None:
    if settings.state_file is not None:
        Path(settings.state_file).unlink(missing_ok=True)


def announce(commands: WorkflowCommands, outcome: Outcome) -> None:
    report = render.Report("InvarLock", outcome, render.Links())
    line = render.title(report)
    if outcome.verdict is None:  # the error may quote the certifier or an artifact
        commands.error(untrusted.log_line(outcome.error or line, 2000),
                       title="InvarLock: could not certify")
    elif outcome.exit_code == 0:
        commands.notice(line, title="InvarLock")
    else:
        commands.error(line, title="InvarLock")


def write_runner_files(settings: Settings, outcome: Outcome) -> None:
    github = settings.github
    if github.output_path is not None:
        write_outputs(github.output_path, outcome.outputs())
    if github.summary_path is not None:
        report = render.Report(settings.check_name, outcome,
                               render.Links(run_url=github.run_url,
                                            artifact_name=settings.artifact_name))
        append_summary(github.summary_path, render.job_summary(report), run_url=github.run_url)
