"""The stored per-window arrays: shapes, domains and the paired arrays they hold.

A certificate's verdict rests on these arrays; they are checked for shape and domain before
any statistic is recomputed from them, so a malformed array is a difference, not a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from invarlock import gate
from invarlock.enums import MetricKind
from invarlock.verification.findings import SETS, Findings


@dataclass(frozen=True)
class Sets:
    kind: MetricKind
    preview: gate.PairedArrays | None  # None only in a malformed certificate
    final: gate.PairedArrays | None  # None when the final set was not evaluated


def check_arrays(cert: Mapping[str, Any], found: Findings) -> Sets | None:
    """Shapes and domains of the stored arrays; the paired arrays when they are sound."""
    found.checked.append("windows")
    win = cert["windows"]
    kind = MetricKind(win["kind"])
    ok = True
    ids_seen: dict[int, str] = {}
    for name in SETS:
        ws = win[name]
        n = len(ws["ids"])
        m = len(ws["baseline"])  # the windows evaluated: a prefix of the plan
        if len(ws["sha256"]) != n:
            found.differ(f"windows.{name}.sha256", f"{len(ws['sha256'])} entries for {n} "
                                                   "window ids")
            ok = False
        if m > n:
            found.differ(f"windows.{name}.baseline", f"{m} entries for {n} window ids")
            ok = False
        if len(ws["tokens"]) != m:
            found.differ(f"windows.{name}.tokens", f"{len(ws['tokens'])} entries for {m} "
                                                   "baseline values")
            ok = False
        subj_n = len(ws["subject"])
        if subj_n != m and not (name == "final" and subj_n == 0 and m == 0):
            found.differ(f"windows.{name}.subject", f"{subj_n} entries for {m} baseline "
                                                    "values")
            ok = False
        if len(set(ws["sha256"])) != len(ws["sha256"]):
            found.differ(f"windows.{name}.sha256", "repeats a window hash (windows are "
                                                   "deduplicated)")
        for i in ws["ids"]:
            if i in ids_seen:
                found.differ(f"windows.{name}.ids", f"window id {i} also appears in "
                                                    f"{ids_seen[i]}")
                break
            ids_seen[i] = name
        ok &= _check_domain(kind, name, ws, win["seq_len"], found)
    if not ok:
        return None
    paired = {name: _paired(win[name]) for name in SETS}
    return Sets(kind, paired["preview"], paired["final"])


def _check_domain(kind: MetricKind, name: str, ws: Mapping[str, Any], seq_len: int,
                  found: Findings) -> bool:
    tokens = np.asarray(ws["tokens"], dtype=np.int64)
    base = np.asarray(ws["baseline"], dtype=np.float64)
    if kind is MetricKind.PPL_CAUSAL:
        bad = np.flatnonzero(tokens != seq_len - 1)
        rule = f"a causal window of {seq_len} tokens scores {seq_len - 1}"
    elif kind is MetricKind.PPL_MLM:
        bad = np.flatnonzero(tokens > seq_len - 2)
        rule = f"a masked-LM window scores at most {seq_len - 2} masked positions"
    else:
        bad = np.flatnonzero(tokens != 1)
        rule = "a classifier example scores 1"
    if bad.size:
        found.differ(f"windows.{name}.tokens[{bad[0]}]", f"{tokens[bad[0]]}, but {rule}")
    if kind is MetricKind.ACCURACY:
        subj = [v for v in ws["subject"] if v is not None]
        if not np.all(np.isin(base, (0.0, 1.0))) or not np.all(np.isin(subj, (0.0, 1.0))):
            found.differ(f"windows.{name}", "classifier correctness values must be 0 or 1")
            return False
    elif base.size and np.min(base) < 0:
        found.differ(f"windows.{name}.baseline", "a negative log-loss sum")
        return False
    return not bad.size


def _paired(ws: Mapping[str, Any]) -> gate.PairedArrays | None:
    """Both sides on the windows the subject was evaluated on (a prefix after an early stop)."""
    if not ws["subject"]:
        return None
    subject = np.array([np.nan if v is None else v for v in ws["subject"]], dtype=np.float64)
    n = subject.size
    return gate.PairedArrays(tokens=np.asarray(ws["tokens"][:n], dtype=np.int64),
                             baseline=np.asarray(ws["baseline"][:n], dtype=np.float64),
                             subject=subject)


def recomputed_overlap(preview_hashes: list[str], final_hashes: list[str]) -> float:
    """Fraction of final windows whose content hash also occurs in the preview set."""
    if not final_hashes:
        return 0.0
    seen = set(preview_hashes)
    return sum(h in seen for h in final_hashes) / len(final_hashes)
