"""A small GitHub REST client: one session, retries, rate limits, errors translated once.

Retries (RetryPolicy):
- connection errors, timeouts and 5xx: exponential backoff, for requests that are safe to
  repeat. A POST that may already have been applied (5xx, read timeout, dropped connection)
  is not blindly repeated: it raises AmbiguousWrite and the caller looks before writing again,
  so a retry never makes a second comment or check run;
- 403/429 rate limits: wait for `retry-after`, else until `x-ratelimit-reset` when the
  remaining quota is 0, else (secondary limit) at least a minute — within `max_wait` seconds
  in total, after which RateLimited is raised. A rate-limited request was not applied, so
  any method may repeat it.

requests' exceptions are translated into GitHubError subclasses here and nowhere else.
Neither the token nor any header is ever logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from invarlock import __version__
from invarlock.errors import InvarlockError

log = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
SECONDARY_RATE_LIMIT_WAIT = 60.0
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"})


class GitHubError(InvarlockError):
    """A GitHub API request failed; `status` is the HTTP status when there was a response.

    Publishing errors never decide the exit code: the entrypoint reports them as warnings.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PermissionDenied(GitHubError):
    """401/403 that is not a rate limit: the token may not do this."""

    @property
    def read_only(self) -> bool:
        """GitHub's answer to a write with a read-only token (fork pull requests, Dependabot)."""
        return "not accessible by" in self.message.lower()


class NotFound(GitHubError):
    pass


class ValidationFailed(GitHubError):
    """422: the request body was refused (for example a comment body that is too long)."""


class RateLimited(GitHubError):
    """Waiting for the rate limit would exceed the time budget."""


class Unavailable(GitHubError):
    """Connection errors, timeouts or 5xx answers outlasted the retries."""


class AmbiguousWrite(Unavailable):
    """A non-idempotent request failed in a way that may have left it applied."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per request for connection errors, timeouts and 5xx
    backoff: float = 1.0  # seconds before the first retry; doubles after each
    max_backoff: float = 30.0
    max_wait: float = 600.0  # seconds of waiting (backoff and rate limits) allowed per request
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


class GitHubClient:
    """JSON in, JSON out, against `api_url` (https://api.github.com or a GHES /api/v3)."""

    def __init__(self, api_url: str, token: str, *, policy: RetryPolicy | None = None,
                 session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.api_url = api_url.rstrip("/")
        self._origin = urlsplit(self.api_url)[:2]
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._session = session or requests.Session()
        self._session.headers.update({
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {token}",
            "User-Agent": f"invarlock-action/{__version__}",
            "X-GitHub-Api-Version": API_VERSION,
        })

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", self._url(path), params=params).json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", self._url(path), body=body).json()

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("PATCH", self._url(path), body=body).json()

    def paginate(self, path: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
        """Items of a list endpoint, following `Link: rel="next"` (never off the API host)."""
        url: str | None = self._url(path)
        query = dict(params or {})
        while url is not None:
            response = self._request("GET", url, params=query)
            page = response.json()
            if not isinstance(page, list):
                raise GitHubError(f"GET {urlsplit(url).path}: expected a list")
            yield from page
            url = response.links.get("next", {}).get("url")
            query = {}  # the next link carries the whole query
            if url is not None and urlsplit(url)[:2] != self._origin:
                raise GitHubError("a pagination link points away from the API host; "
                                  "not following it")

    def _url(self, path: str) -> str:
        return self.api_url + path

    def _request(self, method: str, url: str, *, body: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None) -> requests.Response:
        where = f"{method} {urlsplit(url).path}"
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._session.request(
                    method, url, json=body, params=params,
                    timeout=(self._policy.connect_timeout, self._policy.read_timeout))
            except requests.RequestException as exc:
                failure = _describe(exc)
                if method not in _IDEMPOTENT and not _not_sent(exc):
                    raise AmbiguousWrite(f"{where}: {failure}; it may have been applied") \
                        from None
                wait = self._backoff(attempt)
                if attempt >= self._policy.attempts or waited + wait > self._policy.max_wait:
                    raise Unavailable(f"{where}: {failure} (after {attempt} attempts)") from None
                log.warning("%s: %s; retrying in %.0f s", where, failure, wait)
            else:
                status = response.status_code
                log.debug("%s -> %d", where, status)
                if status < 300:
                    return response
                message = _error_message(response)
                rate_wait = self._rate_limit_wait(response, message)
                if rate_wait is not None:
                    if waited + rate_wait > self._policy.max_wait:
                        raise RateLimited(f"{where}: rate limited ({message}); waiting "
                                          f"{rate_wait:.0f} s would exceed the budget of "
                                          f"{self._policy.max_wait:.0f} s", status=status)
                    log.warning("%s: rate limited; waiting %.0f s", where, rate_wait)
                    wait = rate_wait
                elif status >= 500:
                    if method not in _IDEMPOTENT:
                        raise AmbiguousWrite(f"{where}: HTTP {status} ({message}); it may have "
                                             "been applied", status=status)
                    wait = self._backoff(attempt)
                    if attempt >= self._policy.attempts or waited + wait > self._policy.max_wait:
                        raise Unavailable(f"{where}: HTTP {status} ({message}) after {attempt} "
                                          "attempts", status=status)
                    log.warning("%s: HTTP %d; retrying in %.0f s", where, status, wait)
                else:
                    raise _client_error(where, status, message)
            self._sleep(wait)
            waited += wait

    def _backoff(self, attempt: int) -> float:
        return min(self._policy.backoff * 2 ** (attempt - 1), self._policy.max_backoff)

    def _rate_limit_wait(self, response: requests.Response, message: str) -> float | None:
        """Seconds to wait when the answer is a rate limit, else None."""
        if response.status_code not in (403, 429):
            return None
        headers = response.headers
        retry_after = _float(headers.get("retry-after"))
        if retry_after is not None:
            return max(retry_after, 0.0)
        if headers.get("x-ratelimit-remaining") == "0":
            reset = _float(headers.get("x-ratelimit-reset"))
            if reset is not None:
                return max(reset - self._clock(), 0.0) + 1.0
        if response.status_code == 429 or "rate limit" in message.lower():
            return SECONDARY_RATE_LIMIT_WAIT
        return None


def _client_error(where: str, status: int, message: str) -> GitHubError:
    text = f"{where}: HTTP {status}: {message}"
    if status in (401, 403):
        return PermissionDenied(text, status=status)
    if status == 404:
        return NotFound(text, status=status)
    if status == 422:
        return ValidationFailed(text, status=status)
    return GitHubError(text, status=status)


def _error_message(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.reason or "no message"
    if not isinstance(data, dict):
        return response.reason or "no message"
    message = str(data.get("message") or response.reason or "no message")
    details = [str(e.get("message") or e.get("code")) for e in data.get("errors") or []
               if isinstance(e, dict)]
    return message + (f" ({'; '.join(details)})" if details else "")


def _not_sent(exc: requests.RequestException) -> bool:
    """True when the request surely never reached the server (so repeating it is safe)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        return type(reason).__name__ in ("NewConnectionError", "NameResolutionError")
    return False


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection failed"
    return type(exc).__name__


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
