"""The modes that report results made elsewhere: `publish` (a fork's report folders,
downloaded by a `workflow_run` workflow, published only as what they prove) and `aggregate`
(one comment with a row per subject after a matrix). Neither runs the certifier or needs a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from invarlock.certificate.document import CERT_FILENAME
from invarlock.errors import InvarlockError
from invarlock.github import aggregate
from invarlock.github.artifact import RESULT_FILENAME, bind_report, load_report, recorded_name
from invarlock.github.commands import WorkflowCommands
from invarlock.github.event import load_event, target_for_workflow_run
from invarlock.github.http import GitHubClient
from invarlock.github.lifecycle import Progress, publishing, report
from invarlock.github.outcome import EXIT_EVIDENCE, EXIT_FAIL, EXIT_PASS, Outcome
from invarlock.github.outputs import write_outputs
from invarlock.github.publish import Publisher, verified_pull_request
from invarlock.github.settings import NAME_PATTERN, Mode, Settings, check_name_for, read_input
from invarlock.github.summary import append_summary
from invarlock.github.targets import target_of_this_run


def load_for_publishing(settings: Settings, client: GitHubClient | None,
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


def report_folders(path: Path) -> list[Path]:
    """The report folders inside `path` when it holds several (actions/download-artifact
    with a `pattern` leaves one folder per artifact); empty when `path` is a report itself."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or any(
            os.path.lexists(path / n) for n in (RESULT_FILENAME, CERT_FILENAME)):
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink()
                  and any(os.path.lexists(p / n) for n in (RESULT_FILENAME, CERT_FILENAME)))


def publish_many(settings: Settings, environ: Mapping[str, str], client: GitHubClient | None,
                 commands: WorkflowCommands, folders: list[Path], progress: Progress) -> int:
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
        outcome, publisher = load_for_publishing(one, client, commands,
                                                 find_pull_request=settings.comment)
        progress.publisher = publisher
        report(one, commands, outcome, publisher)
        rows.append(aggregate.Row(name, outcome))
        target = publisher.target or target
    if len(folders) > 1 and settings.comment:
        body = aggregate.render_comment(settings.check_name, rows,
                                        run_url=target.run_url if target else None)
        publisher = Publisher(settings, client, commands, target)
        publishing(commands, "comment", lambda: publisher.comment_text(body))
    code = aggregate.exit_code(rows)
    if settings.github.output_path is not None:
        write_outputs(settings.github.output_path, {"exit-code": str(code), "verdict": {
            EXIT_PASS: "PASS", EXIT_FAIL: "FAIL"}.get(code, "")})
    return code


def aggregate_reports(settings: Settings, client: GitHubClient | None,
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
    target = target_of_this_run(settings, client, commands)
    publisher = Publisher(settings, client, commands, target)
    url = publishing(commands, "comment", lambda: publisher.comment_text(body))
    if url and github.output_path is not None:
        write_outputs(github.output_path, {"comment-url": url})
    return code
