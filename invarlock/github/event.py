"""Where a result belongs: the commit a check run goes on and the pull request (if any).

For `pull_request` events GITHUB_SHA is the merge commit GitHub made for the run; a check run
there is invisible on the pull request, so the head commit from the payload is used. In
publish mode the `workflow_run` payload names the commit the certifying run tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock.errors import InputError

PULL_REQUEST_EVENTS = ("pull_request", "pull_request_target")


@dataclass(frozen=True)
class Target:
    head_sha: str
    pull_request: int | None  # number, or None when there is nothing to comment on
    run_url: str | None  # the workflow run that produced the evidence
    fork: bool = False  # a pull request from another repository: its job token is read-only


@dataclass(frozen=True)
class RecordedTarget:
    """What a certifying run records next to its certificate, for a later publish run."""

    event_name: str
    head_sha: str
    pull_request: int | None
    run_url: str | None
    files: tuple[str, ...] = ()  # repository paths a FAIL's annotations point at

    def as_dict(self) -> dict[str, Any]:
        return {"event_name": self.event_name, "head_sha": self.head_sha,
                "pull_request": self.pull_request, "run_url": self.run_url,
                "files": list(self.files)}

    @classmethod
    def from_dict(cls, data: Any) -> RecordedTarget | None:
        if not isinstance(data, dict):
            return None
        number = data.get("pull_request")
        sha = data.get("head_sha")
        if not isinstance(sha, str) or not (number is None or type(number) is int):
            return None
        run_url = data.get("run_url")
        files = data.get("files")
        files = files if isinstance(files, list) else []
        safe = tuple(f for f in files if isinstance(f, str) and is_repository_path(f))
        return cls(str(data.get("event_name", "")), sha, number,
                   run_url if isinstance(run_url, str) else None, safe[:50])


def is_repository_path(path: str) -> bool:
    """A relative path that stays inside the repository (annotations need one)."""
    parts = path.split("/")
    return (bool(path) and not path.startswith("/") and "\\" not in path
            and all(p not in ("", ".", "..") for p in parts) and len(path) <= 1024)


def load_event(path: Path | None) -> dict[str, Any]:
    """The webhook payload of the running workflow (empty outside GitHub Actions)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"GITHUB_EVENT_PATH points to a missing file: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the event payload {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"the event payload {path} is not a JSON object")
    return data


def target_for_run(event_name: str, payload: dict[str, Any], *, sha: str,
                   run_url: str | None) -> Target:
    """The target of the running workflow (certify mode)."""
    if event_name in PULL_REQUEST_EVENTS and isinstance(payload.get("pull_request"), dict):
        pr = payload["pull_request"]
        head_repo = (pr.get("head") or {}).get("repo") or {}
        base_repo = (pr.get("base") or {}).get("repo") or {}
        fork = head_repo.get("full_name") != base_repo.get("full_name")
        return Target(_sha(pr["head"].get("sha"), "pull_request.head.sha"),
                      int(pr["number"]), run_url, fork)
    if event_name == "merge_group" and isinstance(payload.get("merge_group"), dict):
        return Target(_sha(payload["merge_group"].get("head_sha"), "merge_group.head_sha"),
                      None, run_url)
    return Target(_sha(sha, "GITHUB_SHA"), None, run_url)


def target_for_workflow_run(payload: dict[str, Any]) -> Target:
    """The target of a finished certifying run, from a `workflow_run` payload.

    A pull request listed in the payload is GitHub's own record. Fork pull requests are not
    listed there (pull_request is then None); the publisher falls back to the number the
    certifying run recorded, after checking it with the API.
    """
    run = payload.get("workflow_run")
    if not isinstance(run, dict):
        raise InputError("publish mode needs a workflow_run event; the payload has no "
                         "workflow_run (trigger the publishing workflow with `on: workflow_run`)")
    head_sha = _sha(run.get("head_sha"), "workflow_run.head_sha")
    listed = [pr for pr in run.get("pull_requests") or [] if isinstance(pr, dict)]
    # GitHub lists the pull requests whose branch the run tested; prefer the one whose head is
    # the certified commit, else the first (the report names the commit it certified).
    matching = [pr for pr in listed if (pr.get("head") or {}).get("sha") == head_sha]
    chosen = (matching or listed or [None])[0]
    number = int(chosen["number"]) if chosen is not None else None
    run_url = run.get("html_url") if isinstance(run.get("html_url"), str) else None
    return Target(head_sha, number, run_url)


def _sha(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"no commit to report on: {where} is missing")
    return value
