"""Check runs: one per certification, on the head commit, created and then completed.

The run is created `in_progress` when certification starts (reviewers see it running) and
completed with the conclusion at the end; when the start could not be recorded it is created
completed in one request. `external_id` ties it to the workflow run attempt, so a create
that may have been applied (AmbiguousWrite) is found again instead of made twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from invarlock.github.http import AmbiguousWrite, GitHubClient, ValidationFailed

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 65535  # characters in output.summary and output.text (GitHub's maxLength)
TITLE_LIMIT = 255
ANNOTATIONS_PER_REQUEST = 50  # GitHub's limit; later requests append to the run's annotations


@dataclass(frozen=True)
class Annotation:
    """A finding shown on a file of the pull request's diff (line 1: the file as a whole)."""

    path: str  # relative to the repository root
    message: str
    title: str
    level: str = "failure"  # notice | warning | failure

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "start_line": 1, "end_line": 1,
                "annotation_level": self.level, "title": _clip(self.title, TITLE_LIMIT),
                "message": _clip(self.message, 64 * 1024 - 1)}


@dataclass(frozen=True)
class CheckOutput:
    title: str
    summary: str
    text: str = ""

    def as_dict(self) -> dict[str, str]:
        out = {"title": _clip(self.title, TITLE_LIMIT), "summary": _clip(self.summary,
                                                                          OUTPUT_LIMIT)}
        if self.text:
            out["text"] = _clip(self.text, OUTPUT_LIMIT)
        return out


@dataclass(frozen=True)
class CheckRun:
    id: int
    html_url: str | None


@dataclass(frozen=True)
class CheckSpec:
    """What identifies our check run: its name, commit and the workflow run attempt."""

    name: str
    head_sha: str
    external_id: str
    details_url: str | None


class CheckRuns:
    def __init__(self, client: GitHubClient, owner: str, repo: str) -> None:
        self._client = client
        self._base = f"/repos/{owner}/{repo}"

    def start(self, spec: CheckSpec) -> CheckRun:
        body = {**_identity(spec), "status": "in_progress", "started_at": _now()}
        return self._create(spec, body)

    def complete(self, spec: CheckSpec, run: CheckRun | None, conclusion: str,
                 output: CheckOutput, fallback: CheckOutput,
                 annotations: Sequence[Annotation] = ()) -> CheckRun:
        """Complete `run` (or create it completed); on 422 retry once with `fallback`.

        Annotations go 50 per request: the first batch with the completion, the rest in
        further updates (GitHub appends them).
        """
        batches = [list(annotations[i:i + ANNOTATIONS_PER_REQUEST])
                   for i in range(0, len(annotations), ANNOTATIONS_PER_REQUEST)] or [[]]
        try:
            done = self._complete(spec, run, conclusion, output, batches[0])
        except ValidationFailed as exc:
            log.warning("check run output refused (%s); sending a shorter one", exc)
            done = self._complete(spec, run, conclusion, fallback, batches[0])
            output = fallback
        for batch in batches[1:]:
            self._client.patch(f"{self._base}/check-runs/{done.id}",
                               {"output": {**output.as_dict(), "annotations":
                                           [a.as_dict() for a in batch]}})
        return done

    def _complete(self, spec: CheckSpec, run: CheckRun | None, conclusion: str,
                  output: CheckOutput, annotations: Sequence[Annotation] = ()) -> CheckRun:
        out: dict[str, Any] = output.as_dict()
        if annotations:
            out["annotations"] = [a.as_dict() for a in annotations]
        body = {"status": "completed", "conclusion": conclusion, "completed_at": _now(),
                "output": out}
        if run is None:
            return self._create(spec, {**_identity(spec), **body})
        data = self._client.patch(f"{self._base}/check-runs/{run.id}",
                                  {**_identity(spec, with_sha=False), **body})
        return _check_run(data)

    def _create(self, spec: CheckSpec, body: dict[str, Any]) -> CheckRun:
        try:
            return _check_run(self._client.post(f"{self._base}/check-runs", body))
        except AmbiguousWrite:
            found = self._find(spec)
            if found is None:
                return _check_run(self._client.post(f"{self._base}/check-runs", body))
            if body.get("status") == "completed":  # the lost create may have been in_progress
                return self._complete(spec, found, body["conclusion"], _output(body),
                                      _annotations(body))
            return found

    def _find(self, spec: CheckSpec) -> CheckRun | None:
        data = self._client.get(f"{self._base}/commits/{spec.head_sha}/check-runs",
                                {"check_name": spec.name, "filter": "all", "per_page": 100})
        for item in data.get("check_runs", []):
            if item.get("external_id") == spec.external_id:
                return _check_run(item)
        return None


def _identity(spec: CheckSpec, *, with_sha: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"name": spec.name, "external_id": spec.external_id}
    if with_sha:
        body["head_sha"] = spec.head_sha
    if spec.details_url:
        body["details_url"] = spec.details_url
    return body


def _output(body: dict[str, Any]) -> CheckOutput:
    out = body["output"]
    return CheckOutput(out["title"], out["summary"], out.get("text", ""))


def _annotations(body: dict[str, Any]) -> list[Annotation]:
    return [Annotation(a["path"], a["message"], a["title"], a["annotation_level"])
            for a in body["output"].get("annotations", [])]


def _check_run(data: Any) -> CheckRun:
    return CheckRun(int(data["id"]), data.get("html_url"))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
