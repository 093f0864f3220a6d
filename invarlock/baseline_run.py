"""The baseline's per-window results, scored only as far as the decision needs them.

A sequential run decides most subjects after a small fraction of the planned windows, so
the baseline is not scored on the whole plan up front. Every run scores the baseline on the
preview windows the design uses and on the final windows up to its first look (the guards'
calibration windows are among them); further final windows are scored when a look needs
them:

- **lockstep**: when the baseline and the subject fit the memory budget together, the
  baseline model stays resident and scores each look's block just before the subject does;
- **blocks**: otherwise one model is resident at a time, and the baseline scores the whole
  remaining plan before the subject is loaded (the fixed design's cost for the baseline).

The results held here are always a prefix of each planned set, in plan order. A cached
baseline with fewer windows than a run needs is extended, and the longer entry replaces it
in the cache, so later subjects find more windows there.

No torch here: the caller hands in the `score` callable that runs the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np

from invarlock.cache import CachedScores
from invarlock.errors import EvidenceError
from invarlock.sequential_run import head_scores, window_range

log = logging.getLogger(__name__)

Score = Callable[[Any], Any]  # WindowSet -> WindowScores, the baseline model's results


class Schedule(str, Enum):
    """How the baseline's windows are scored beside the subject's."""

    LOCKSTEP = "lockstep"  # both models resident: the baseline scores each look's block
    BLOCKS = "blocks"  # one model resident at a time: the baseline scores ahead


class BaselineScores:
    """The baseline's results on a prefix of each planned set, extended on demand.

    `score` runs the baseline model on a block of windows (None when no model can be had:
    then every window asked for must already be here). `stored` is called with the sets
    after each extension (the cache entry is rewritten from them)."""

    def __init__(self, plan: Any, sets: dict[str, Any], *, score: Score | None = None,
                 stored: Callable[[dict[str, Any]], None] | None = None) -> None:
        for name, scores in sets.items():
            if not is_prefix(getattr(plan, name).window_ids, scores.window_ids):
                raise ValueError(f"the baseline's {name} results are not a prefix of the plan")
        self.plan = plan
        self.sets = dict(sets)
        self.score = score
        self.stored = stored
        self.scored = dict.fromkeys(sets, 0)  # windows this process scored, per set

    def have(self, name: str) -> int:
        return len(self.sets[name].window_ids)

    def upto(self, name: str, n: int) -> Any:
        """The results on the first `n` windows of set `name`, scoring the missing ones."""
        planned = getattr(self.plan, name)
        if not 0 <= n <= planned.n:
            raise ValueError(f"{n} windows asked of the {planned.n}-window {name} set")
        have = self.have(name)
        if have < n:
            if self.score is None:
                raise EvidenceError(f"the baseline's results cover {have} {name} windows and "
                                    f"the run needs {n}, but no baseline model is available")
            log.info("baseline: scoring %s windows %d..%d", name, have, n)
            more = self.score(window_range(planned, have, n))
            if more.nonfinite_windows:
                raise EvidenceError(f"the baseline produced non-finite outputs on "
                                    f"{more.nonfinite_windows} windows; there is nothing sound "
                                    "to compare the subject with")
            self.sets[name] = join(self.sets[name], more)
            self.scored[name] += n - have
            if self.stored is not None:
                self.stored(self.sets)
        return head_scores(self.sets[name], n)


def is_prefix(planned: np.ndarray, ids: np.ndarray) -> bool:
    """Whether `ids` are the first windows of the plan, in order."""
    ids = np.asarray(ids)
    return ids.size <= planned.size and bool(np.array_equal(planned[:ids.size], ids))


def join(head: Any, tail: Any) -> CachedScores:
    """One set's results from two consecutive blocks (either one the cache's copy)."""
    dist = None
    if head.distribution is not None and tail.distribution is not None:
        dist = type(head.distribution)(**{
            f: np.concatenate([getattr(head.distribution, f), getattr(tail.distribution, f)])
            for f in ("window_ids", "tokens", "top_ids", "top_logp", "tail_logp",
                      "target_logp")})
    return CachedScores(
        window_ids=np.concatenate([head.window_ids, tail.window_ids]).astype(np.int64),
        sha256=(*head.sha256, *tail.sha256),
        tokens=np.concatenate([head.tokens, tail.tokens]).astype(np.int64),
        values=np.concatenate([head.values, tail.values]).astype(np.float64),
        fed_sha256=(*head.fed_sha256, *tail.fed_sha256),
        nonfinite_windows=int(head.nonfinite_windows) + int(tail.nonfinite_windows),
        distribution=dist)


def schedule(model_bytes: int, free_bytes: int | None, *, headroom: int = 256 * 2**20,
             placed: bool = False) -> Schedule:
    """Lockstep when a second model of `model_bytes` (the subject: the same architecture)
    fits in `free_bytes` with 20% and `headroom` to spare; blocks otherwise, when the free
    memory is unknown, or when a device map already spreads one model over the budget."""
    if placed or free_bytes is None:
        return Schedule.BLOCKS
    return Schedule.LOCKSTEP if model_bytes * 1.2 + headroom <= free_bytes else Schedule.BLOCKS
