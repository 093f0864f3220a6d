"""One sticky comment per pull request and check name, updated in place on every push.

The comment is recognised by a hidden marker on its first line that names the check **and**
by its author, the token's own identity: anyone can paste the marker into a comment of their
own, and such a comment is never edited. Two differently named InvarLock checks keep two
comments. An unchanged body is not written again. Listing pages through every comment (a
busy pull request has more than one page).

The identity: `GET /user` answers for personal tokens; installation tokens (the job's
GITHUB_TOKEN) are refused there, and the job token writes as `github-actions[bot]`. A
GitHub App's own token writes as `<app-slug>[bot]`: give it as input `comment-author`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from invarlock.github.http import AmbiguousWrite, GitHubClient, PermissionDenied, ValidationFailed

log = logging.getLogger(__name__)

BODY_LIMIT = 65536  # characters GitHub accepts in a comment body
JOB_TOKEN_LOGIN = "github-actions[bot]"


def token_login(client: GitHubClient) -> str:
    """The login comments written with this client's token carry."""
    try:
        user = client.get("/user")
    except PermissionDenied:  # an installation token: the job token's bot
        return JOB_TOKEN_LOGIN
    login = user.get("login") if isinstance(user, dict) else None
    return str(login) if login else JOB_TOKEN_LOGIN


def marker(check_name: str, *, aggregate: bool = False, head_sha: str = "") -> str:
    """The hidden first line; the name is percent-encoded so it cannot end the HTML comment.

    The aggregate's marker also names the head commit its rows are for; the comment is still
    found by kind and check name alone (`marker_key`), whatever commit it names.
    """
    kind = "aggregate-comment" if aggregate else "sticky-comment"
    head = f" head={quote(head_sha, safe='')}" if head_sha else ""
    return f"<!-- invarlock:{kind} check={quote(check_name, safe='')}{head} -->"


def marker_key(line: str) -> str:
    """A marker line without its head commit: what identifies the comment."""
    return re.sub(r" head=[^ ]*", "", line.strip())


def marker_head(line: str) -> str:
    """The head commit a marker line names (empty when none)."""
    found = re.search(r" head=([0-9a-f]+)", line)
    return found.group(1) if found else ""


@dataclass(frozen=True)
class Comment:
    id: int
    html_url: str | None
    body: str = ""


class StickyComment:
    def __init__(self, client: GitHubClient, owner: str, repo: str, number: int,
                 marker_line: str, author: str) -> None:
        self._client = client
        self._base = f"/repos/{owner}/{repo}/issues"
        self._number = number
        self._marker = marker_line
        self._author = author

    def find(self) -> Comment | None:
        """The first comment by our author whose first line is our marker."""
        for item in self._client.paginate(f"{self._base}/{self._number}/comments",
                                          {"per_page": 100}):
            body = item.get("body") or ""
            login = (item.get("user") or {}).get("login")
            if marker_key(body.split("\n", 1)[0]) == marker_key(self._marker):
                if login == self._author:
                    return _comment(item)
                log.info("comment %s carries the marker but is by %s, not %s: left alone",
                         item.get("id"), login, self._author)
        return None

    def upsert(self, body: str, fallback: str) -> Comment:
        """Update the sticky comment or create it; on 422 send `fallback` instead.

        A create that may have been applied is not repeated blindly: the comments are listed
        again first, so a retry never leaves two comments.
        """
        try:
            return self._upsert(body)
        except ValidationFailed as exc:
            log.warning("comment refused (%s); sending a shorter one", exc)
            return self._upsert(fallback)

    def _upsert(self, body: str) -> Comment:
        text = self._with_marker(body)
        for attempt in (1, 2):
            existing = self.find()
            try:
                if existing is not None and existing.body == text:
                    log.info("the comment is unchanged; not rewritten")
                    return existing
                if existing is not None:
                    data = self._client.patch(f"{self._base}/comments/{existing.id}",
                                              {"body": text})
                else:
                    data = self._client.post(f"{self._base}/{self._number}/comments",
                                             {"body": text})
                return _comment(data)
            except AmbiguousWrite:
                if attempt == 2:
                    raise
                log.warning("writing the comment may have failed; looking before retrying")
        raise AssertionError("unreachable")

    def _with_marker(self, body: str) -> str:
        text = f"{self._marker}\n{body}"
        if len(text) > BODY_LIMIT:
            raise ValueError(f"comment body of {len(text)} characters exceeds {BODY_LIMIT}; "
                             "render it with a limit")
        return text


def _comment(data: Any) -> Comment:
    return Comment(int(data["id"]), data.get("html_url"), str(data.get("body") or ""))
