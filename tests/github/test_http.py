"""The HTTP client against the API stand-in: retries, rate limits, timeouts, error classes,
pagination, and writes that are never doubled by a retry."""

from __future__ import annotations

import logging
import socket

import pytest

from invarlock.github.checks import Annotation, CheckOutput, CheckRuns, CheckSpec
from invarlock.github.comments import StickyComment, marker, token_login
from invarlock.github.http import (
    AmbiguousWrite,
    GitHubClient,
    NotFound,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    Unavailable,
    ValidationFailed,
)
from tests.github.conftest import TOKEN
from tests.github.standin import Fault, GitHubStandIn, body_too_long_fault, read_only_fault

REPO = "/repos/Codertocat/Hello-World"
SPEC = CheckSpec("InvarLock", "a" * 40, "invarlock:1:1", None)
FAST = RetryPolicy(attempts=4, backoff=0.5, max_wait=100.0, read_timeout=5.0)


class Clock:
    """A fake clock and sleep: waits are recorded, not slept."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return self.now


def client(server: GitHubStandIn, clock: Clock, *, token: str = TOKEN,
           policy: RetryPolicy = FAST) -> GitHubClient:
    return GitHubClient(server.url, token, policy=policy, sleep=clock.sleep, clock=clock.time)


def sticky(c: GitHubClient, author: str = "github-actions[bot]") -> StickyComment:
    return StickyComment(c, "Codertocat", "Hello-World", 2, marker("InvarLock"), author)


def test_server_errors_are_retried_with_backoff(standin):
    clock = Clock()
    standin.inject("issues/list-comments", Fault(500), Fault(502))
    assert client(standin, clock).get(f"{REPO}/issues/2/comments") == []
    assert clock.sleeps == [0.5, 1.0]
    assert standin.calls() == ["issues/list-comments -> 500", "issues/list-comments -> 502",
                               "issues/list-comments -> 200"]


def test_server_errors_outlasting_the_retries_raise_unavailable(standin):
    clock = Clock()
    standin.inject("issues/list-comments", *[Fault(503)] * 4)
    with pytest.raises(Unavailable, match=r"HTTP 503 .* after 4 attempts"):
        client(standin, clock).get(f"{REPO}/issues/2/comments")
    assert len(clock.sleeps) == 3


def test_a_failed_create_is_looked_for_before_it_is_repeated(standin):
    """500 then success on POST: exactly one comment exists afterwards."""
    standin.inject("issues/create-comment", Fault(500))
    comment = sticky(client(standin, Clock())).upsert("body", "short")
    assert standin.calls() == ["issues/list-comments -> 200", "issues/create-comment -> 500",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]
    assert [c["id"] for c in standin.comments[2]] == [comment.id]


def test_a_create_that_was_applied_despite_the_error_is_not_repeated(standin):
    standin.inject("issues/create-comment", Fault(502, applied=True))
    sticky(client(standin, Clock())).upsert("body", "short")
    # looked for again: found, with the very body, so nothing more is written
    assert standin.calls() == ["issues/list-comments -> 200", "issues/create-comment -> 502",
                               "issues/list-comments -> 200"]
    assert len(standin.comments[2]) == 1


def test_a_check_run_create_that_timed_out_is_found_by_its_external_id(standin):
    c = GitHubClient(standin.url, TOKEN, policy=RetryPolicy(read_timeout=0.3))
    standin.inject("checks/create", Fault(delay=0.8, applied=True))  # made, answered too late
    run = CheckRuns(c, "Codertocat", "Hello-World").start(SPEC)
    assert standin.calls()[-1] == "checks/list-for-ref -> 200"
    assert list(standin.check_runs) == [run.id]


def test_a_read_timeout_on_a_get_is_retried(standin):
    c = GitHubClient(standin.url, TOKEN, policy=RetryPolicy(read_timeout=0.3, backoff=0.01))
    standin.inject("issues/list-comments", Fault(delay=0.8))
    assert c.get(f"{REPO}/issues/2/comments") == []
    assert [r.call for r in standin.log][-1] == "issues/list-comments -> 200"


def test_retry_after_is_honoured(standin):
    clock = Clock()
    standin.inject("checks/create", Fault(403, {"message": "You have exceeded a secondary rate "
                                                           "limit."}, {"Retry-After": "7"}))
    CheckRuns(client(standin, clock), "Codertocat", "Hello-World").start(SPEC)
    assert clock.sleeps == [7.0]
    assert standin.calls() == ["checks/create -> 403", "checks/create -> 201"]
    assert len(standin.check_runs) == 1


def test_retry_after_really_waits(standin):
    standin.inject("issues/list-comments",
                   Fault(429, {"message": "Too many requests"}, {"Retry-After": "1"}))
    import time

    start = time.monotonic()
    GitHubClient(standin.url, TOKEN, policy=FAST).get(f"{REPO}/issues/2/comments")
    assert time.monotonic() - start >= 1.0


def test_primary_rate_limit_waits_until_the_reset(standin):
    clock = Clock()
    reset = int(clock.now) + 42
    standin.inject("issues/list-comments", Fault(
        403, {"message": "API rate limit exceeded"},
        {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}))
    client(standin, clock).get(f"{REPO}/issues/2/comments")
    assert clock.sleeps == [43.0]


def test_secondary_rate_limit_without_headers_waits_a_minute(standin):
    clock = Clock()
    standin.inject("issues/list-comments", Fault(403, {"message": "secondary rate limit"}))
    client(standin, clock).get(f"{REPO}/issues/2/comments")
    assert clock.sleeps == [60.0]


def test_rate_limit_waits_are_bounded(standin):
    clock = Clock()
    standin.inject("issues/list-comments",
                   Fault(403, {"message": "rate limited"}, {"retry-after": "3600"}))
    with pytest.raises(RateLimited, match="would exceed the budget of 100 s"):
        client(standin, clock).get(f"{REPO}/issues/2/comments")
    assert clock.sleeps == []


def test_read_only_token_is_permission_denied(standin):
    c = client(standin, Clock(), token="ghs_ReadOnly")
    with pytest.raises(PermissionDenied, match="Resource not accessible by integration") as info:
        c.post(f"{REPO}/check-runs", {"name": "x", "head_sha": "a" * 40})
    assert info.value.read_only and info.value.status == 403
    standin.inject("checks/create", read_only_fault())
    with pytest.raises(PermissionDenied):
        client(standin, Clock()).post(f"{REPO}/check-runs", {"name": "x", "head_sha": "a" * 40})


def test_bad_credentials_and_missing_resources(standin):
    with pytest.raises(PermissionDenied, match="401: Bad credentials") as info:
        client(standin, Clock(), token="wrong").get(f"{REPO}/issues/2/comments")
    assert not info.value.read_only
    with pytest.raises(NotFound):
        client(standin, Clock()).get(f"{REPO}/check-runs/999")


def test_validation_failures_carry_github_s_message(standin):
    standin.inject("issues/create-comment", body_too_long_fault())
    with pytest.raises(ValidationFailed, match="body is too long"):
        client(standin, Clock()).post(f"{REPO}/issues/2/comments", {"body": "x"})


def test_sticky_comment_falls_back_to_the_short_body_on_422(standin):
    standin.inject("issues/create-comment", body_too_long_fault())
    sticky(client(standin, Clock())).upsert("the long report", "the short report")
    assert standin.comments[2][0]["body"].endswith("the short report")
    assert standin.log[1].body["body"].endswith("the long report")


def test_the_stand_in_enforces_github_s_comment_limit(standin):
    with pytest.raises(ValidationFailed, match="65536"):
        client(standin, Clock()).post(f"{REPO}/issues/2/comments", {"body": "x" * 65537})


def test_connection_refused_is_retried_even_for_a_post():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    clock = Clock()
    c = GitHubClient(f"http://127.0.0.1:{port}", TOKEN, policy=FAST, sleep=clock.sleep)
    with pytest.raises(Unavailable, match="connection failed"):
        c.post(f"{REPO}/check-runs", {"name": "x"})
    assert len(clock.sleeps) == 3  # never sent, so safe to repeat


def test_post_server_error_is_ambiguous(standin):
    standin.inject("checks/create", Fault(500))
    with pytest.raises(AmbiguousWrite):
        client(standin, Clock()).post(f"{REPO}/check-runs", {"name": "x", "head_sha": "a" * 40})


def test_pagination_follows_every_page(standin):
    for i in range(205):
        standin.add_comment(2, f"comment {i}")
    bodies = [c["body"] for c in client(standin, Clock()).paginate(f"{REPO}/issues/2/comments",
                                                                    {"per_page": 100})]
    assert bodies == [f"comment {i}" for i in range(205)]
    assert standin.log[1].query == {"per_page": "100", "page": "2"}


def test_the_sticky_comment_is_found_on_a_later_page_and_updated(standin):
    for i in range(150):
        standin.add_comment(2, f"chatter {i}")
    c = client(standin, Clock())
    first = sticky(c).upsert("first report", "short")
    for i in range(60):
        standin.add_comment(2, f"more chatter {i}")
    standin.reset_log()
    second = sticky(c).upsert("second report", "short")
    assert second.id == first.id
    assert standin.calls() == ["issues/list-comments -> 200", "issues/list-comments -> 200",
                               "issues/update-comment -> 200"]
    ours = [x for x in standin.comments[2] if x["body"].startswith("<!-- invarlock")]
    assert len(ours) == 1 and ours[0]["body"].endswith("second report")


def test_a_marker_for_another_check_name_is_left_alone(standin):
    c = client(standin, Clock())
    StickyComment(c, "Codertocat", "Hello-World", 2, marker("InvarLock (int4)"),
                  "github-actions[bot]").upsert("a", "a")
    sticky(c).upsert("b", "b")
    assert len(standin.comments[2]) == 2
    assert marker("x --> <b>") == "<!-- invarlock:sticky-comment check=x%20--%3E%20%3Cb%3E -->"


def test_a_planted_marker_comment_by_someone_else_is_never_edited(standin):
    planted = standin.add_comment(2, marker("InvarLock") + "\nPASS, trust me", login="mallory")
    c = client(standin, Clock())
    ours = sticky(c).upsert("the real report", "short")
    assert ours.id != planted["id"]
    bodies = {x["id"]: x["body"] for x in standin.comments[2]}
    assert bodies[planted["id"]].endswith("PASS, trust me")
    assert standin.calls()[-1] == "issues/create-comment -> 201"
    standin.reset_log()
    again = sticky(c).upsert("the next report", "short")
    assert again.id == ours.id and standin.calls()[-1] == "issues/update-comment -> 200"


def test_an_unchanged_body_is_not_rewritten(standin):
    c = client(standin, Clock())
    first = sticky(c).upsert("same report", "short")
    standin.reset_log()
    again = sticky(c).upsert("same report", "short")
    assert again.id == first.id
    assert standin.calls() == ["issues/list-comments -> 200"]


def test_the_token_identity_decides_whose_comment_is_ours():
    """A personal token is its user (GET /user); the job token is github-actions[bot]."""
    personal = "ghp_PersonalToken"
    with GitHubStandIn(tokens={TOKEN: "write", personal: "write"},
                       personal={personal: "octo-maintainer"}) as server:
        assert token_login(client(server, Clock())) == "github-actions[bot]"
        mine = client(server, Clock(), token=personal)
        assert token_login(mine) == "octo-maintainer"
        bot = sticky(client(server, Clock())).upsert("by the bot", "s")
        person = sticky(mine, "octo-maintainer").upsert("by the person", "s")
        assert bot.id != person.id
        assert server.calls().count("users/get-authenticated -> 403") == 1
        assert server.problems == []


def test_annotations_go_fifty_per_request(standin):
    runs = CheckRuns(client(standin, Clock()), "Codertocat", "Hello-World")
    started = runs.start(SPEC)
    notes = [Annotation("models/int4/config.json", f"reason {i}", "InvarLock FAIL")
             for i in range(120)]
    runs.complete(SPEC, started, "failure", CheckOutput("FAIL", "report"),
                  CheckOutput("FAIL", "short"), notes)
    updates = [r.body for r in standin.log if r.operation == "checks/update"]
    assert [len(u["output"]["annotations"]) for u in updates] == [50, 50, 20]
    assert updates[0]["conclusion"] == "failure"
    assert [a["message"] for u in updates for a in u["output"]["annotations"]] == \
        [f"reason {i}" for i in range(120)]


def test_pagination_never_follows_a_link_to_another_host(monkeypatch, standin):
    import requests

    original = requests.Session.request

    def forged(self, method, url, **kwargs):
        response = original(self, method, url, **kwargs)
        response.headers["Link"] = '<https://evil.example.com/steal?page=2>; rel="next"'
        return response

    monkeypatch.setattr(requests.Session, "request", forged)
    with pytest.raises(Exception, match="points away from the API host"):
        list(client(standin, Clock()).paginate(f"{REPO}/issues/2/comments"))


def test_the_ghes_path_prefix_is_kept():
    with GitHubStandIn(tokens={TOKEN: "write"}, prefix="/api/v3") as server:
        assert server.url.endswith("/api/v3")
        CheckRuns(client(server, Clock()), "Codertocat", "Hello-World").start(SPEC)
        assert server.log[0].path == "/api/v3/repos/Codertocat/Hello-World/check-runs"
        assert server.problems == []


def test_the_token_never_reaches_the_log_or_errors(standin, caplog):
    caplog.set_level(logging.DEBUG)
    standin.inject("issues/list-comments", Fault(500))
    c = client(standin, Clock())
    c.get(f"{REPO}/issues/2/comments")
    with pytest.raises(PermissionDenied) as info:
        client(standin, Clock(), token=TOKEN + "x").get(f"{REPO}/issues/2/comments")
    assert TOKEN not in caplog.text and TOKEN not in str(info.value)
    assert caplog.text  # there was logging to check
