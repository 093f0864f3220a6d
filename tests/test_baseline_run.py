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


@pytest.mark.parametrize(("n_min", "step", "n_max", "ends"), [
    (32, 8, 64, (32, 64)),  # the demo: one block past the first
    (32, 8, 800, (32, 64, 128, 256, 512, 800)),  # doubling, capped at the maximum
    (25, 10, 200, (25, 55, 105, 200)),  # 50 and 100 are no looks: rounded up to one
    (40, 40, 100, (40, 80, 100)),  # the maximum is a look however the step falls
    (30, 50, 100, (30, 80, 100)),  # looks 30, 80, 100: 60 rounds up to 80, 120 caps
    (25, 1, 26, (25, 26)),
])
def test_blocks_double_from_the_first_look_and_end_at_looks(n_min, step, n_max, ends):
    from invarlock.sequential import look_schedule

    looks = look_schedule(n_min, n_max, step)
    got = br.block_ends(looks)
    assert got == ends
    assert got[0] == looks[0] and got[-1] == n_max and set(got) <= set(looks)
    # each block at least doubles the windows the first one held, never more than one look
    # past the doubled count
    for k, end in enumerate(got[1:], start=1):
        assert end >= min(n_min * 2**k, n_max)
        assert end == n_max or [t for t in looks if n_min * 2**k <= t < end] == []


def test_block_arithmetic_refuses_what_is_no_look_schedule():
    for looks in ([], [5, 5], [8, 4], [0, 4]):
        with pytest.raises(ValueError, match="strictly increasing"):
            br.block_ends(looks)
    assert [br.block_end((4, 8, 16), n) for n in (1, 4, 5, 8, 16)] == [4, 4, 8, 8, 16]
    with pytest.raises(ValueError, match="past the last block end 16"):
        br.block_end((4, 8, 16), 17)


def test_with_block_ends_a_request_is_rounded_up_to_its_block_and_recorded():
    """One model at a time: a look at 6 has the baseline score to the block end 10, and the
    next look inside that block asks for nothing; every range scored is recorded."""
    scored: list[tuple[int, int]] = []

    def score(windows):
        ids = windows.window_ids
        scored.append((int(ids[0]), int(ids[-1]) + 1))
        return _scores(ids)

    sets = {"preview": _scores(np.arange(0, 4)), "final": _scores(np.arange(100, 105))}
    blocks = [[0, 5]]
    scores = br.BaselineScores(PLAN, sets, score=score, blocks=blocks)
    scores.ends = (5, 10, 20)
    assert scores.upto("final", 6).window_ids.size == 6
    assert scored == [(105, 110)] and scores.have("final") == 10
    scores.upto("final", 8)
    assert len(scored) == 1
    scores.upto("final", 11)
    assert scored[-1] == (110, 120) and scores.scored["final"] == 15
    assert blocks == [[0, 5], [5, 10], [10, 20]]
    scores.upto("preview", 6)  # the preview is no block schedule: exactly what is asked
    assert scored[-1] == (4, 6) and blocks[-1] == [10, 20]
