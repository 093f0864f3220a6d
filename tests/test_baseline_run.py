"""The baseline's results grown on demand: only the windows asked for are scored, in plan
order, each extension is handed to the cache; the schedule is lockstep only when a second
model fits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from invarlock import baseline_run as br
from invarlock.cache import CachedScores
from invarlock.errors import EvidenceError


@dataclasses.dataclass(frozen=True)
class _Set:
    name: str
    window_ids: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: object = None
    token_type_ids: object = None
    sha256: tuple = ()

    @property
    def n(self) -> int:
        return int(self.window_ids.size)


@dataclasses.dataclass(frozen=True)
class _Plan:
    preview: _Set
    final: _Set


def _set(name: str, ids: range) -> _Set:
    n = len(ids)
    return _Set(name, np.asarray(ids, dtype=np.int64), np.zeros((n, 2), np.int64),
                np.ones((n, 2), np.int64), sha256=tuple(f"h{i}" for i in ids))


def _scores(ids: np.ndarray, nan: bool = False) -> CachedScores:
    values = ids.astype(float) * 10.0
    if nan:
        values[-1] = np.nan
    return CachedScores(window_ids=ids, sha256=tuple(f"h{i}" for i in ids),
                        tokens=np.full(ids.size, 7), values=values,
                        fed_sha256=tuple(f"f{i}" for i in ids),
                        nonfinite_windows=int(np.isnan(values).sum()))


PLAN = _Plan(_set("preview", range(0, 8)), _set("final", range(100, 120)))


def test_only_missing_windows_are_scored_and_each_extension_is_stored():
    scored: list[list[int]] = []
    stored: list[int] = []

    def score(windows):
        scored.append(windows.window_ids.tolist())
        return _scores(windows.window_ids)

    sets = {"preview": _scores(np.arange(0, 4)), "final": _scores(np.arange(100, 105))}
    scores = br.BaselineScores(PLAN, sets, score=score,
                               stored=lambda s: stored.append(len(s["final"].window_ids)))
    assert scores.upto("final", 3).window_ids.tolist() == [100, 101, 102]
    assert scored == []  # already there
    head = scores.upto("final", 12)
    assert scored == [list(range(105, 112))] and stored == [12]
    assert head.values.tolist() == [10.0 * i for i in range(100, 112)]
    assert head.fed_sha256[-1] == "f111" and scores.scored["final"] == 7
    scores.upto("final", 12)
    assert len(scored) == 1


def test_a_baseline_without_a_model_or_with_broken_windows_is_refused():
    sets = {"preview": _scores(np.arange(0, 4)), "final": _scores(np.arange(100, 105))}
    with pytest.raises(EvidenceError, match="no baseline model"):
        br.BaselineScores(PLAN, sets).upto("final", 6)
    broken = br.BaselineScores(PLAN, sets, score=lambda w: _scores(w.window_ids, nan=True))
    with pytest.raises(EvidenceError, match="non-finite"):
        broken.upto("final", 6)
    with pytest.raises(ValueError, match="not a prefix"):
        br.BaselineScores(PLAN, {"preview": _scores(np.arange(1, 4))})


def test_lockstep_only_when_a_second_model_fits_with_room_to_spare():
    gib = 2**30
    assert br.schedule(gib, 2 * gib) is br.Schedule.LOCKSTEP
    assert br.schedule(gib, int(1.2 * gib)) is br.Schedule.BLOCKS  # no headroom
    assert br.schedule(gib, None) is br.Schedule.BLOCKS
    assert br.schedule(gib, 100 * gib, placed=True) is br.Schedule.BLOCKS


def test_a_prefix_is_the_plans_first_windows_in_order():
    planned = np.arange(10, 20)
    assert br.is_prefix(planned, np.arange(10, 13)) and br.is_prefix(planned, planned[:0])
    assert not br.is_prefix(planned, np.array([11, 12]))
    assert not br.is_prefix(planned, np.arange(10, 21))
