"""A GitHub REST API stand-in: a real HTTP server on 127.0.0.1 for the Action's tests.

It serves the operations the Action uses from GitHub's own OpenAPI description: each request
is matched to an operation and its parameters and JSON body are validated against GitHub's
schemas (a request GitHub would refuse is answered 422 and recorded as a problem); each
answer is built from GitHub's examples and validated against the response schema too.
Behaviour that matters for the client is modelled: tokens with write or read-only access
(403 "Resource not accessible by integration"), comment bodies over 65,536 characters (422),
pagination with `Link` headers, an optional GHES-style path prefix (`/api/v3`).

Faults are injected per operation id and consumed in order: a status with headers and body
(500 then success, 403 with retry-after, 422), a delay (client timeouts), and `applied=True`
for a change that is made although the answer fails or comes too late (an ambiguous write).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests.github.openapi import OpenAPI

COMMENT_LIMIT = 65536
DOCS = "https://docs.github.com/rest"
READ_ONLY_MESSAGE = "Resource not accessible by integration"


@dataclass(frozen=True)
class Hold:
    """A request held at the stand-in until the test releases it (no timing involved)."""

    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Fault:
    status: int | None = None  # None: answer normally (after `delay`)
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (with `applied`: after making the change)
    applied: bool = False  # make the change, then answer (with `status` when given)
    hold: Hold | None = None  # wait for the test's release before answering


def read_only_fault() -> Fault:
    return Fault(403, {"message": READ_ONLY_MESSAGE, "documentation_url": DOCS})


def body_too_long_fault() -> Fault:
    return Fault(422, {"message": "Validation Failed", "documentation_url": DOCS,
                       "errors": [{"resource": "IssueComment", "code": "custom", "field": "body",
                                   "message": "body is too long (maximum is 65536 characters)"}]})


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    operation: str | None
    query: dict[str, str]
    body: Any
    status: int

    @property
    def call(self) -> str:
        """`operation -> status`, the form the conversation assertions use."""
        return f"{self.operation} -> {self.status}"


class GitHubStandIn:
    def __init__(self, *, tokens: dict[str, str] | None = None, prefix: str = "",
                 repository: str = "Codertocat/Hello-World",
                 personal: dict[str, str] | None = None) -> None:
        self.api = OpenAPI()
        self.tokens = tokens if tokens is not None else {"test-token": "write"}
        # Tokens of a person (token -> login): GET /user answers and comments are theirs.
        # Every other token is an installation token, like the job's GITHUB_TOKEN: GET /user
        # is refused (403) and comments are written as github-actions[bot].
        self.personal = personal or {}
        self.prefix = prefix.rstrip("/")
        self.repository = repository
        self.log: list[Recorded] = []
        self.problems: list[str] = []
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, list[dict[str, Any]]] = {}
        self.pulls: dict[int, str] = {}  # number -> head sha
        self._faults: dict[str, deque[Fault]] = {}
        self._lock = threading.Lock()
        self._next_id = 1000
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> GitHubStandIn:
        handler = _handler_for(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{self.prefix}"

    # -------------------------------------------------------------------------- test helpers

    def inject(self, operation: str, *faults: Fault) -> None:
        with self._lock:
            self._faults.setdefault(operation, deque()).extend(faults)

    def calls(self) -> list[str]:
        return [r.call for r in self.log]

    def add_comment(self, number: int, body: str, *, login: str = "octocat") -> dict[str, Any]:
        with self._lock:
            return self._new_comment(number, body, login)

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    # -------------------------------------------------------------------------- dispatch

    def handle(self, method: str, target: str, headers: dict[str, str],
               raw: bytes) -> tuple[int, dict[str, str], Any]:
        split = urlsplit(target)
        path = split.path
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                return self._record(method, path, None, query, raw, 400,
                                    {"message": "Problems parsing JSON"}, problem="bad JSON")
        if self.prefix and not path.startswith(self.prefix + "/"):
            return self._record(method, path, None, query, body, 404, {"message": "Not Found"},
                                problem=f"path outside the API prefix: {path}")
        full_path, path = path, path[len(self.prefix):]
        found = self.api.match(method, path)
        if found is None:
            return self._record(method, full_path, None, query, body, 404, {"message": "Not Found"},
                                problem=f"no such operation: {method} {path}")
        op, params = found
        header_problem = _header_problem(headers)
        if header_problem:
            return self._record(method, full_path, op.operation_id, query, body, 400,
                                {"message": header_problem}, problem=header_problem)
        token = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token not in self.tokens:
            return self._record(method, full_path, op.operation_id, query, body, 401,
                                {"message": "Bad credentials", "documentation_url": DOCS})
        errors = self.api.parameter_errors(op, params, query) + self.api.request_errors(op, body)
        if errors:
            return self._record(method, full_path, op.operation_id, query, body, 422,
                                _validation(errors), problem=f"{op.operation_id}: {errors}")
        repository_scoped = "owner" in params
        if repository_scoped and f"{params.get('owner')}/{params.get('repo')}" != self.repository:
            return self._record(method, full_path, op.operation_id, query, body, 404,
                                {"message": "Not Found", "documentation_url": DOCS},
                                problem=f"wrong repository {params.get('owner')}/"
                                        f"{params.get('repo')}")
        fault = self._next_fault(op.operation_id)
        if fault is not None and fault.hold is not None:
            fault.hold.arrived.set()
            if not fault.hold.release.wait(600):  # a hang guard, generous under load
                self.problems.append(f"{op.operation_id}: held and never released")
        if fault is not None and fault.delay and not fault.applied:
            time.sleep(fault.delay)
        if fault is not None and fault.status is not None and not fault.applied:
            return self._record(method, full_path, op.operation_id, query, body, fault.status,
                                fault.body, headers=fault.headers)
        if method != "GET" and self.tokens[token] != "write":
            return self._record(method, full_path, op.operation_id, query, body, 403,
                                {"message": READ_ONLY_MESSAGE, "documentation_url": DOCS})
        with self._lock:
            status, out_headers, answer = self._operate(op.operation_id, params, query, body,
                                                        path, token)
        if status < 300:
            problems = self.api.response_errors(op, status, answer)
            if problems:
                self.problems.append(f"stand-in answered {op.operation_id} off-schema: "
                                     f"{problems[:3]}")
        if fault is not None and fault.applied and fault.delay:
            time.sleep(fault.delay)  # applied, but the answer comes late
        if fault is not None and fault.applied and fault.status is not None:
            return self._record(method, full_path, op.operation_id, query, body, fault.status,
                                fault.body, headers=fault.headers)
        return self._record(method, full_path, op.operation_id, query, body, status, answer,
                            headers=out_headers)

    def _next_fault(self, operation: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(operation)
            return queue.popleft() if queue else None

    def _record(self, method: str, path: str, operation: str | None, query: dict[str, str],
                body: Any, status: int, answer: Any, *, headers: dict[str, str] | None = None,
                problem: str | None = None) -> tuple[int, dict[str, str], Any]:
        with self._lock:
            self.log.append(Recorded(method, path, operation, query, body, status))
            if problem:
                self.problems.append(problem)
        return status, headers or {}, answer

    # -------------------------------------------------------------------------- operations

    def _operate(self, operation: str, params: dict[str, str], query: dict[str, str],
                 body: Any, path: str, token: str) -> tuple[int, dict[str, str], Any]:
        if operation == "users/get-authenticated":
            if token not in self.personal:
                return 403, {}, {"message": READ_ONLY_MESSAGE, "documentation_url": DOCS}
            user = copy.deepcopy(self.api.examples[
                "private-user-response-with-public-and-private-profile-information"])
            user["login"] = self.personal[token]
            return 200, {}, user
        if operation == "checks/create":
            run = self._new_check_run(body)
            return 201, {}, run
        if operation in ("checks/get", "checks/update"):
            run = self.check_runs.get(int(params["check_run_id"]))
            if run is None:
                return 404, {}, {"message": "Not Found", "documentation_url": DOCS}
            if operation == "checks/update":
                _apply_check_update(run, body)
            return 200, {}, copy.deepcopy(run)
        if operation == "checks/list-for-ref":
            runs = [r for r in self.check_runs.values() if r["head_sha"] == params["ref"]
                    and ("check_name" not in query or r["name"] == query["check_name"])]
            return 200, {}, {"total_count": len(runs), "check_runs": copy.deepcopy(runs)}
        if operation == "issues/list-comments":
            return self._list_comments(int(params["issue_number"]), query, path)
        if operation == "issues/create-comment":
            if len(body["body"]) > COMMENT_LIMIT:
                return 422, {}, body_too_long_fault().body
            return 201, {}, self._new_comment(int(params["issue_number"]), body["body"],
                                              self.personal.get(token, "github-actions[bot]"))
        if operation in ("issues/get-comment", "issues/update-comment"):
            comment = self._find_comment(int(params["comment_id"]))
            if comment is None:
                return 404, {}, {"message": "Not Found", "documentation_url": DOCS}
            if operation == "issues/update-comment":
                if len(body["body"]) > COMMENT_LIMIT:
                    return 422, {}, body_too_long_fault().body
                comment["body"] = body["body"]
                comment["updated_at"] = _now()
            return 200, {}, copy.deepcopy(comment)
        if operation == "pulls/get":
            number = int(params["pull_number"])
            if number not in self.pulls:
                return 404, {}, {"message": "Not Found", "documentation_url": DOCS}
            pr = copy.deepcopy(self.api.examples["pull-request"])
            pr["number"] = number
            pr["head"]["sha"] = self.pulls[number]
            pr["requested_teams"] = []  # GitHub's example omits a required field there
            return 200, {}, pr
        if operation == "rate-limit/get":
            return 200, {}, copy.deepcopy(self.api.examples["rate-limit-overview"])
        return 501, {}, {"message": f"{operation} is not modelled by the stand-in"}

    def _new_check_run(self, body: dict[str, Any]) -> dict[str, Any]:
        run = copy.deepcopy(self.api.examples["check-run"])
        run_id = self._new_id()
        owner_repo = self.repository
        run.update({
            "id": run_id, "node_id": f"CR_{run_id}", "name": body["name"],
            "head_sha": body["head_sha"], "external_id": body.get("external_id", ""),
            "details_url": body.get("details_url", ""), "status": body.get("status", "queued"),
            "conclusion": None, "started_at": body.get("started_at", _now()),
            "completed_at": None,
            "url": f"https://api.github.com/repos/{owner_repo}/check-runs/{run_id}",
            "html_url": f"https://github.com/{owner_repo}/runs/{run_id}",
            "output": {"title": None, "summary": None, "text": None, "annotations_count": 0,
                       "annotations_url": f"https://api.github.com/repos/{owner_repo}/"
                                          f"check-runs/{run_id}/annotations"},
            "pull_requests": [],
        })
        _apply_check_update(run, body)
        self.check_runs[run_id] = run
        return copy.deepcopy(run)

    def _new_comment(self, number: int, text: str, login: str) -> dict[str, Any]:
        comment = copy.deepcopy(self.api.examples["issue-comment"])
        comment_id = self._new_id()
        repo = self.repository
        comment.update({
            "id": comment_id, "node_id": f"IC_{comment_id}", "body": text,
            "url": f"https://api.github.com/repos/{repo}/issues/comments/{comment_id}",
            "html_url": f"https://github.com/{repo}/pull/{number}#issuecomment-{comment_id}",
            "issue_url": f"https://api.github.com/repos/{repo}/issues/{number}",
            "created_at": _now(), "updated_at": _now(),
        })
        comment["user"] = {**comment["user"], "login": login,
                           "type": "Bot" if login.endswith("[bot]") else "User"}
        self.comments.setdefault(number, []).append(comment)
        return copy.deepcopy(comment)

    def _find_comment(self, comment_id: int) -> dict[str, Any] | None:
        for comments in self.comments.values():
            for comment in comments:
                if comment["id"] == comment_id:
                    return comment
        return None

    def _list_comments(self, number: int, query: dict[str, str],
                       path: str) -> tuple[int, dict[str, str], Any]:
        per_page = min(int(query.get("per_page", 30)), 100)
        page = int(query.get("page", 1))
        items = self.comments.get(number, [])
        chunk = items[(page - 1) * per_page: page * per_page]
        headers = {}
        last = max(1, -(-len(items) // per_page))
        if page < last:
            base = self.url + path
            links = [f'<{base}?{urlencode({"per_page": per_page, "page": page + 1})}>; '
                     'rel="next"',
                     f'<{base}?{urlencode({"per_page": per_page, "page": last})}>; rel="last"']
            headers["Link"] = ", ".join(links)
        return 200, headers, copy.deepcopy(chunk)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id


def _apply_check_update(run: dict[str, Any], body: dict[str, Any]) -> None:
    for key in ("name", "details_url", "external_id", "started_at", "status", "conclusion",
                "completed_at"):
        if key in body:
            run[key] = body[key]
    if body.get("conclusion"):
        run["status"] = "completed"
        run["completed_at"] = run["completed_at"] or _now()
    if "output" in body:
        for key in ("title", "summary", "text"):
            if key in body["output"]:
                run["output"][key] = body["output"][key]


def _header_problem(headers: dict[str, str]) -> str | None:
    if "application/vnd.github" not in headers.get("accept", ""):
        return "Accept must be application/vnd.github+json"
    if not headers.get("user-agent"):
        return "User-Agent is required"
    if headers.get("x-github-api-version") != "2022-11-28":
        return "X-GitHub-Api-Version must be 2022-11-28"
    return None


def _validation(errors: list[str]) -> dict[str, Any]:
    return {"message": "Invalid request.\n\n" + "\n".join(errors[:5]),
            "documentation_url": DOCS, "errors": [{"code": "invalid", "message": e[:200]}
                                                  for e in errors[:5]]}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _handler_for(app: GitHubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, answer = app.handle(self.command, self.path, headers, raw)
            data = b"" if answer is None else json.dumps(answer).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
