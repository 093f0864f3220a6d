"""On-disk cache of baseline per-window results.

A team certifies many subjects against one baseline; the baseline's results depend only on
its weights, the tokenizer, the window plan, the metric and how it was run (dtype, device
type, tool version), so they are computed once. Entries are JSON, written atomically, and
checked against their key on read: a corrupt or foreign entry is ignored, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from invarlock import atomic

log = logging.getLogger(__name__)

FORMAT = "invarlock.baseline-cache/1"


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


def default_cache_dir() -> Path:
    """$INVARLOCK_CACHE_DIR, else $XDG_CACHE_HOME/invarlock, else ~/.cache/invarlock."""
    explicit = os.environ.get("INVARLOCK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "invarlock"


class BaselineCache:
    """Per-window baseline results by key, one JSON file per entry."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def _path(self, key: CacheKey) -> Path:
        return self.root / "baseline" / f"{key.digest}.json"

    def load(self, key: CacheKey) -> dict[str, Any] | None:
        """The stored payload for `key`, or None when absent or unreadable."""
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable baseline cache entry %s: %s", path, exc)
            return None
        if entry.get("format") != FORMAT or entry.get("key") != asdict(key):
            log.warning("ignoring baseline cache entry %s: key mismatch", path)
            return None
        return entry.get("payload")

    def store(self, key: CacheKey, payload: dict[str, Any]) -> Path | None:
        """Write an entry atomically; a cache that cannot be written only costs time."""
        entry = {"format": FORMAT, "key": asdict(key), "payload": payload}
        try:
            return atomic.write_text(self._path(key), json.dumps(entry, allow_nan=False))
        except (OSError, ValueError) as exc:
            log.warning("could not write baseline cache entry: %s", exc)
            return None


@dataclass(frozen=True)
class CachedScores:
    """Baseline results as read back from the cache (the fields the pipeline uses)."""

    window_ids: np.ndarray
    sha256: tuple[str, ...]
    tokens: np.ndarray
    values: np.ndarray
    nonfinite_windows: int = 0


def scores_to_payload(sets: dict[str, Any], parameters: int) -> dict[str, Any]:
    """The JSON form of the baseline's preview/final results."""
    return {"parameters": parameters,
            "sets": {name: {"window_ids": [int(i) for i in s.window_ids],
                            "sha256": list(s.sha256), "tokens": [int(n) for n in s.tokens],
                            "values": [float(v) for v in s.values]}
                     for name, s in sets.items()}}


def scores_from_payload(payload: dict[str, Any] | None,
                        ) -> tuple[dict[str, CachedScores], int] | None:
    """The baseline's preview/final results from a payload, or None if it does not hold them."""
    if payload is None:
        return None
    try:
        sets = {name: CachedScores(np.asarray(p["window_ids"], dtype=np.int64),
                                   tuple(p["sha256"]),
                                   np.asarray(p["tokens"], dtype=np.int64),
                                   np.asarray(p["values"], dtype=np.float64))
                for name in ("preview", "final") for p in [payload["sets"][name]]}
        return sets, int(payload["parameters"])
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring malformed baseline cache entry")
        return None
