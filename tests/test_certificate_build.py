"""The certificate's windows section: what a verifier recomputes the interval from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from invarlock.certificate.build import windows_section
from invarlock.data.windows import WindowPlan, WindowSet
from invarlock.enums import MetricKind


def _set(name: str, ids: list[int]) -> WindowSet:
    n = len(ids)
    return WindowSet(name=name, window_ids=np.asarray(ids, dtype=np.int64),
                     input_ids=np.zeros((n, 8), dtype=np.int64),
                     attention_mask=np.ones((n, 8), dtype=np.int64), labels=None,
                     token_type_ids=None, sha256=tuple(f"h{i}" for i in ids))


def _plan() -> WindowPlan:
    return WindowPlan(kind=MetricKind.PPL_CAUSAL, seq_len=8, stride=8, seed=3,
                      preview=_set("preview", [4, 1]), final=_set("final", [7, 2, 9]),
                      available=np.int64(12), duplicates_dropped=np.int64(1),
                      total_tokens=96, requested=(2, 4), dataset_digest="sha256:d",
                      tokenizer_hash="sha256:t")


def _scores(values: list[float]) -> SimpleNamespace:
    return SimpleNamespace(tokens=np.full(len(values), 7, dtype=np.int64),
                           values=np.asarray(values, dtype=np.float64))


def test_broken_subject_windows_are_null_and_an_unevaluated_set_is_empty():
    plan = _plan()
    base = {"preview": _scores([10.0, 11.0]), "final": _scores([12.0, 13.0, 14.0])}
    subj = {"preview": _scores([10.5, np.nan]), "final": None}
    section = windows_section(plan, base, subj)
    assert section["preview"] == {"ids": [4, 1], "sha256": ["h4", "h1"], "tokens": [7, 7],
                                  "baseline": [10.0, 11.0], "subject": [10.5, None]}
    assert section["final"]["subject"] == []
    assert section["final"]["baseline"] == [12.0, 13.0, 14.0]
    assert section["requested"] == {"preview_n": 2, "final_n": 4}
    assert section["plan_digest"] == plan.digest


def test_windows_section_holds_only_json_native_numbers():
    section = windows_section(_plan(), {"preview": _scores([1.0, 2.0]),
                                         "final": _scores([3.0, 4.0, 5.0])},
                               {"preview": _scores([1.0, np.inf]),
                                "final": _scores([3.0, 4.0, 5.0])})
    assert type(section["available"]) is int and type(section["duplicates_dropped"]) is int
    assert all(type(v) is int for v in section["final"]["ids"] + section["final"]["tokens"])
    assert section["preview"]["subject"] == [1.0, None]
    assert all(type(v) is float for v in section["final"]["subject"])
