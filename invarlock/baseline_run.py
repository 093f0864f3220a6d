"""The baseline's per-window results, scored only as far as the decision needs them.

A sequential run decides most subjects after a small fraction of the planned windows, so
the baseline is not scored on the whole plan up front. Every run scores the baseline on the
preview windows the design uses and on the final windows up to its first look (the guards'
calibration windows are among them); further final windows are scored when a look needs
them:

- **lockstep**: when the baseline and the subject fit the memory budget together, the
  baseline model stays resident and scores each look's block just before the subject does;
- **blocks**: otherwise one model is resident at a time. The baseline scores the final
  windows in blocks that double the windows held (`block_ends`: the first look, then
  2·n_min, 4·n_min, … each rounded up to a look, capped at the maximum); a look past the
  windows held lets the subject go while the baseline scores the next block, then brings
  the subject back. Where the subject cannot be let go and brought back exactly (a device
  map, a side llama.cpp serves, a quantized checkpoint, an edit not known to reproduce),
  the one block after the first is the rest of the plan, scored before the subject loads.

The results held here are always a prefix of each planned set, in plan order; the final
ranges scored are recorded in order (`blocks`). A cached baseline with fewer windows than a
run needs is extended, and the longer entry replaces it in the cache, so later subjects find
more windows there.

No torch here: the caller hands in the `score` callable that runs the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from enum import Enum
from itertools import pairwise
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
    after each extension (the cache entry is rewritten from them). `ends`, when set, are
    the final set's block ends: a request is rounded up to the next one. Every final range
    scored is appended to `blocks` ([first, end) pairs, in order: the certificate's record).
    """

    def __init__(self, plan: Any, sets: dict[str, Any], *, score: Score | None = None,
                 stored: Callable[[dict[str, Any]], None] | None = None,
                 blocks: list[list[int]] | None = None) -> None:
        for name, scores in sets.items():
            if not is_prefix(getattr(plan, name).window_ids, scores.window_ids):
                raise ValueError(f"the baseline's {name} results are not a prefix of the plan")
        self.plan = plan
        self.sets = dict(sets)
        self.score = score
        self.stored = stored
        self.scored = dict.fromkeys(sets, 0)  # windows this process scored, per set
        self.ends: tuple[int, ...] | None = None  # final block ends (blocks schedule)
        self.blocks = [] if blocks is None else blocks

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
            end = n if name != "final" or self.ends is None else block_end(self.ends, n)
            log.info("baseline: scoring %s windows %d..%d", name, have, end)
            more = self.score(window_range(planned, have, end))
            if more.nonfinite_windows:
                raise EvidenceError(f"the baseline produced non-finite outputs on "
                                    f"{more.nonfinite_windows} windows; there is nothing sound "
                                    "to compare the subject with")
            self.sets[name] = join(self.sets[name], more)
            self.scored[name] += end - have
            if name == "final":
                self.blocks.append([have, end])
            if self.stored is not None:
                self.stored(self.sets)
        return head_scores(self.sets[name], n)


def block_ends(looks: Sequence[int]) -> tuple[int, ...]:
    """Where the baseline's final blocks end when one model is resident at a time.

    The first block ends at the first look (n_min: no look before it can decide); each later
    one doubles the windows held, n_min·2^k, rounded up to the next look so that a block
    ends exactly where the subject looks, and capped at the maximum (the last look). A run
    that stops at look t has the baseline score fewer than 2·t windows beyond n_min's
    rounding, and at most ⌈log2(n_max/n_min)⌉ + 1 blocks, each one swap of the models.
    """
    looks = tuple(int(t) for t in looks)
    if not looks or any(b <= a for a, b in pairwise(looks)) or looks[0] < 1:
        raise ValueError(f"looks must be positive and strictly increasing, got {looks}")
    ends = [looks[0]]
    target = looks[0]
    while ends[-1] < looks[-1]:
        target *= 2
        end = next((t for t in looks if t >= target), looks[-1])
        if end > ends[-1]:
            ends.append(end)
    return tuple(ends)


def block_end(ends: Sequence[int], n: int) -> int:
    """The end of the block that holds window count `n` (the first end at or past it)."""
    found = next((e for e in ends if e >= n), None)
    if found is None:
        raise ValueError(f"{n} windows lie past the last block end {ends[-1]}")
    return int(found)


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
