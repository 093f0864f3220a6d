"""On-disk cache of baseline per-window results.

A team certifies many subjects against one baseline; the baseline's results depend only on
its weights, the tokenizer, the window plan, the metric and how it was run (dtype, device
type, tool version), so they are computed once. Entries are JSON, written atomically, with a
sha256 digest of their payload. On read an entry must match its key, its digest and the
payload schema (equal-length per-window arrays of finite numbers): anything else is ignored
with one warning, and the run that evaluates the baseline again replaces it. The
certificate records the digest of the payload it used.

A self-digest proves only that an entry is intact, not who wrote it: anyone who can write to
a shared cache folder can plant a self-consistent entry. With a secret (`--cache-secret-file`)
each entry also carries an HMAC-SHA256 over its canonical content, keyed by the secret and the
entry's trust namespace; an entry whose HMAC is missing or wrong is ignored like a corrupt
one. Namespaces (`trusted`, `untrusted`) are separate folders with separate keys, so results
computed for a fork are never read by a trusted run, even when copied across.

A language model's entry also holds the baseline's compact next-token distribution per set
(`distribution`: top-k log-probabilities per scored token, as base64 arrays), so a cached
baseline still gives the subject's KL divergence; an entry without it is evaluated again,
unless the baseline cannot have one (scored by llama.cpp, which gives per-token losses only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from invarlock import atomic
from invarlock.distribution import CompactDistribution
from invarlock.enums import StrEnum
from invarlock.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "invarlock.baseline-cache/2"
SECRET_MIN_BYTES = 16  # shorter secrets can be guessed; `openssl rand -hex 32` gives 64
HMAC_PREFIX = "hmac-sha256:"

_WINDOW_SET = {
    "type": "object",
    "required": ["window_ids", "sha256", "fed_sha256", "tokens", "values"],
    "properties": {
        "window_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "sha256": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        "fed_sha256": {"type": "array",
                       "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "values": {"type": "array", "items": {"type": "number"}},
    },
}
PAYLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["parameters", "sets", "guards"],
    "properties": {
        "parameters": {"type": "integer", "minimum": 0},
        "sets": {"type": "object", "required": ["preview", "final"],
                 "properties": {"preview": _WINDOW_SET, "final": _WINDOW_SET}},
        "guards": {"type": "object"},
        "distribution": {"type": "object", "required": ["preview", "final"],
                         "properties": {"preview": {"type": "object"},
                                        "final": {"type": "object"}}},
    },
}
_reported: set[str] = set()  # entries already warned about in this process


@dataclass(frozen=True)
class CacheKey:
    weights_digest: str
    tokenizer_hash: str
    plan_digest: str
    metric: str
    dtype: str
    device_type: str
    tool_version: str

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Namespace(StrEnum):
    """Trust level of the run that reads and writes entries: a folder and a key of its own."""

    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"  # runs of code nobody with write access vouched for (forks)


def read_secret(path: Path) -> bytes:
    """The cache secret from its file (one trailing newline dropped); InputError otherwise."""
    try:
        if Path(path).stat().st_mode & 0o077:
            log.warning("cache secret file %s can be read by other users; make it 0600", path)
        secret = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"cache secret file {path} not found") from None
    except OSError as exc:
        raise InputError(f"cache secret file {path} cannot be read: "
                         f"{exc.strerror or exc}") from None
    secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if len(secret) < SECRET_MIN_BYTES:
        raise InputError(f"cache secret file {path} holds {len(secret)} bytes; a secret needs "
                         f"at least {SECRET_MIN_BYTES}", hint="openssl rand -hex 32")
    return secret


def entry_hmac(secret: bytes, namespace: str, entry: dict[str, Any]) -> str:
    """HMAC-SHA256 over the canonical JSON of an entry without its `hmac` field.

    The key is derived from the secret and the namespace (HMAC(secret, namespace)), so an
    entry moved from one namespace's folder to another's does not verify there."""
    key = hmac.new(secret, f"invarlock.baseline-cache:{namespace}".encode(),
                   hashlib.sha256).digest()
    content = {k: v for k, v in entry.items() if k != "hmac"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return HMAC_PREFIX + hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def default_cache_dir() -> Path:
    """$INVARLOCK_CACHE_DIR, else $XDG_CACHE_HOME/invarlock, else ~/.cache/invarlock."""
    explicit = os.environ.get("INVARLOCK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "invarlock"


class BaselineCache:
    """Per-window baseline results by key, one JSON file per entry.

    `secret`: entries are signed on write and must verify on read. `namespace`: entries live
    under `<root>/<namespace>/`; without one the folder is `<root>/baseline` (local use)."""

    def __init__(self, root: Path | None = None, *, secret: bytes | None = None,
                 namespace: Namespace | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self._secret = secret
        self.namespace = namespace

    def __repr__(self) -> str:  # never the secret
        return (f"BaselineCache({str(self.root)!r}, signed={self._secret is not None}, "
                f"namespace={self.namespace})")

    @property
    def signed(self) -> bool:
        return self._secret is not None

    def path(self, key: CacheKey) -> Path:
        folder = self.root if self.namespace is None else self.root / str(self.namespace)
        return folder / "baseline" / f"{key.digest}.json"

    def _hmac(self, entry: dict[str, Any]) -> str:
        assert self._secret is not None
        return entry_hmac(self._secret, str(self.namespace or "local"), entry)

    def load(self, key: CacheKey) -> CacheHit | None:
        """The stored payload for `key` with its digest, or None when absent or not sound."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            return _ignored(path, f"unreadable ({type(exc).__name__})")
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            return _ignored(path, "not a baseline cache entry of this version")
        if self._secret is not None:
            mac = entry.get("hmac")
            if not isinstance(mac, str):
                return _ignored(path, "no HMAC, and this cache is keyed with a secret")
            try:
                expected = self._hmac(entry)
            except (TypeError, ValueError):
                return _ignored(path, "entry is not plain JSON")
            if not hmac.compare_digest(mac, expected):
                return _ignored(path, "HMAC does not verify: not written by a run holding "
                                      "this cache's secret for this namespace")
        if entry.get("namespace", None) != (None if self.namespace is None
                                            else str(self.namespace)):
            return _ignored(path, "entry of another trust namespace")
        if entry.get("key") != asdict(key):
            return _ignored(path, "key mismatch")
        payload = entry.get("payload")
        try:
            digest = payload_digest(payload)
        except (TypeError, ValueError):
            return _ignored(path, "payload is not plain JSON")
        if entry.get("payload_digest") != digest:
            return _ignored(path, "payload does not match its digest")
        problem = payload_problem(payload)
        if problem:
            return _ignored(path, problem)
        return CacheHit(payload, digest)

    def store(self, key: CacheKey, payload: dict[str, Any]) -> str:
        """Write an entry atomically; a cache that cannot be written only costs time.

        Returns the payload digest (the certificate records it either way)."""
        digest = payload_digest(payload)
        entry: dict[str, Any] = {"format": FORMAT, "key": asdict(key),
                                 "payload_digest": digest, "payload": payload}
        if self.namespace is not None:
            entry["namespace"] = str(self.namespace)
        try:
            if self._secret is not None:
                entry["hmac"] = self._hmac(entry)
            atomic.write_text(self.path(key), json.dumps(entry, allow_nan=False))
        except (OSError, ValueError) as exc:
            log.warning("could not write baseline cache entry: %s", exc)
        return digest


@dataclass(frozen=True)
class CacheHit:
    payload: dict[str, Any]
    digest: str


def payload_digest(payload: Any) -> str:
    """sha256 over the canonical JSON of a payload (sorted keys, compact, no NaN)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def payload_problem(payload: Any) -> str | None:
    """Why a payload cannot be the baseline's results, or None when it can."""
    from jsonschema import Draft202012Validator

    error = next(iter(Draft202012Validator(PAYLOAD_SCHEMA).iter_errors(payload)), None)
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "payload"
        return f"{where}: {error.message}"[:200]
    for name in ("preview", "final"):
        s = payload["sets"][name]
        if len({len(s[k]) for k in ("window_ids", "sha256", "fed_sha256", "tokens",
                                    "values")}) != 1:
            return f"sets.{name}: per-window arrays of different lengths"
        if not all(math.isfinite(v) for v in s["values"]):
            return f"sets.{name}.values: a non-finite value"
        if "distribution" in payload:
            try:
                compact = CompactDistribution.from_json(payload["distribution"][name])
            except (KeyError, TypeError, ValueError) as exc:
                return f"distribution.{name}: {exc}"[:200]
            if (compact.window_ids.tolist() != s["window_ids"]
                    or compact.tokens.tolist() != s["tokens"]):
                return f"distribution.{name}: windows or token counts differ from the set's"
    return None


def _ignored(path: Path, why: str) -> None:
    if str(path) not in _reported:
        _reported.add(str(path))
        log.warning("ignoring baseline cache entry %s (%s); the baseline is evaluated again "
                    "and the entry replaced", path, why)
    return None


@dataclass(frozen=True)
class CachedScores:
    """Baseline results as read back from the cache (the fields the pipeline uses)."""

    window_ids: np.ndarray
    sha256: tuple[str, ...]
    tokens: np.ndarray
    values: np.ndarray
    fed_sha256: tuple[str, ...]  # hashes of the tensors the baseline was fed (pairing)
    nonfinite_windows: int = 0
    distribution: CompactDistribution | None = None  # language models: compact next-token


def scores_to_payload(sets: dict[str, Any], parameters: int) -> dict[str, Any]:
    """The JSON form of the baseline's preview/final results (and compact distributions)."""
    payload: dict[str, Any] = {
        "parameters": parameters,
        "sets": {name: {"window_ids": [int(i) for i in s.window_ids],
                        "sha256": list(s.sha256), "fed_sha256": list(s.fed_sha256),
                        "tokens": [int(n) for n in s.tokens],
                        "values": [float(v) for v in s.values]}
                 for name, s in sets.items()}}
    compact = {name: getattr(s, "distribution", None) for name, s in sets.items()}
    if all(isinstance(c, CompactDistribution) for c in compact.values()):
        payload["distribution"] = {name: c.to_json() for name, c in compact.items()}
    return payload


def scores_from_payload(payload: dict[str, Any] | None,
                        ) -> tuple[dict[str, CachedScores], int] | None:
    """The baseline's preview/final results from a checked payload (None stays None)."""
    if payload is None:
        return None
    try:
        dist = payload.get("distribution")
        sets = {name: CachedScores(np.asarray(p["window_ids"], dtype=np.int64),
                                   tuple(p["sha256"]),
                                   np.asarray(p["tokens"], dtype=np.int64),
                                   np.asarray(p["values"], dtype=np.float64),
                                   tuple(p["fed_sha256"]),
                                   distribution=None if dist is None
                                   else CompactDistribution.from_json(dist[name]))
                for name in ("preview", "final") for p in [payload["sets"][name]]}
        return sets, int(payload["parameters"])
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring malformed baseline cache entry")
        return None
