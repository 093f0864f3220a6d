"""The `sequential` section recomputed from the policy's design and the window arrays.

A sequential run stops at a look; what it decided there, and that it stopped at the first
deciding look, follow from the stored differences alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock import baseline_run, sequential_run
from invarlock.certificate.sequential_view import phrase as sequential_phrase
from invarlock.errors import ConfigError
from invarlock.policy import ResolvedPolicy
from invarlock.verification.findings import Findings
from invarlock.verification.windows import Sets


def recheck_sequence(cert: Mapping[str, Any], policy: ResolvedPolicy, sets: Sets,
                     found: Findings) -> sequential_run.SequentialOutcome | None:
    """The `sequential` section recomputed from the policy's design and the window arrays:
    the σ̂ floor from the preview set, the differences in stored (evaluation) order, every
    look and the decision; and the run must have stopped exactly at the first deciding look,
    or at the maximum. An altered, dropped or reordered look or difference shows here."""
    stored = cert.get("sequential")
    try:
        design = planned_design(cert, policy)
    except ConfigError as exc:
        found.differ("sequential", f"the policy's sequential design is invalid ({exc})")
        return None
    if design is None or sets.final is None or sets.preview is None:
        if stored is not None:
            found.differ("sequential", "present although the policy's design is off or the "
                                       "final set was not evaluated")
        return None
    found.checked.append("sequential")
    if stored is None:
        found.differ("sequential", "missing although the policy's sequential design is on")
        return None
    kind, prev, fin = sets.kind, sets.preview, sets.final
    outcome = sequential_run.sequence(
        design, sequential_run.threshold_for(kind, policy),
        sequential_run.preview_floor(kind, prev.tokens, prev.baseline, prev.subject),
        sequential_run.differences(kind, fin.tokens, fin.baseline, fin.subject))
    found.compare("sequential", stored, sequential_run.section(outcome))
    n, result = outcome.stopped_at, outcome.result
    found.notes.append(_sequence_note(outcome))
    if n not in design.looks:
        found.differ("sequential.stopped_at", f"{n} windows evaluated, which is no look of "
                                              f"the design {list(design.looks)}")
    elif result is not None and result.stopped_at != n:
        found.differ("sequential.stopped_at", f"{n} windows evaluated but the look at "
                                              f"{result.stopped_at} already decided "
                                              f"{result.decision.value}")
    elif result is not None and not outcome.early and n != design.n_max:
        found.differ("sequential.stopped_at", f"stopped undecided after {n} windows, before "
                                              f"the maximum {design.n_max}")
    return outcome


def _sequence_note(outcome: sequential_run.SequentialOutcome) -> str:
    """The recomputed decision in the words the reports use (sequential_view.phrase)."""
    result = outcome.result
    looks = 0 if result is None else len(result.looks)
    decision = "nonfinite" if result is None else result.decision.value
    ended = sequential_phrase(outcome.stopped_at, outcome.design.n_max, decision)
    return f"sequential test {ended}; {looks} look(s) recomputed from the stored differences"


def planned_design(cert: Mapping[str, Any], policy: ResolvedPolicy) -> Any:
    """The policy's sequential design for the planned sets of this certificate (None: off)."""
    win = cert["windows"]
    return sequential_run.design_for(policy, len(win["final"]["ids"]), len(win["preview"]["ids"]))


def check_evaluated_counts(cert: Mapping[str, Any], policy: ResolvedPolicy,
                           found: Findings) -> None:
    """The preview windows evaluated are exactly the design's cut (the whole set without a
    design): a run that scored fewer, or more and kept the ones it liked, shows here."""
    win = cert["windows"]
    try:
        design = planned_design(cert, policy)
    except ConfigError:
        return  # reported by the sequence's own recheck
    planned = len(win["preview"]["ids"])
    expected = sequential_run.preview_needed(design, planned)
    n = len(win["preview"]["subject"])
    if n != expected:
        why = (f"the design scores the first {expected}" if design is not None
               else f"the fixed design scores all {planned}")
        found.differ("windows.preview.subject", f"{n} windows evaluated, but {why}")


def check_baseline_blocks(cert: Mapping[str, Any], policy: ResolvedPolicy,
                          found: Findings) -> None:
    """The final ranges the baseline was scored on (`baseline.final_blocks`) follow its
    schedule: consecutive, each ending at a look (lockstep), at a block end of the doubling
    (blocks), or at the plan's end without a design; from window 0 unless the cache held the
    first ones, and covering every final window the subject was compared on."""
    base = cert.get("baseline") or {}
    blocks = base.get("final_blocks")
    if blocks is None:
        return  # a certificate from before the record
    found.checked.append("baseline blocks")
    win = cert["windows"]
    planned = len(win["final"]["ids"])
    try:
        design = planned_design(cert, policy)
    except ConfigError:
        return  # reported by the sequence's own recheck
    if design is None:
        ends, what = {planned}, f"the end of the {planned}-window plan (no design)"
    elif base.get("schedule") == baseline_run.Schedule.BLOCKS.value:
        ends = set(baseline_run.block_ends(design.looks))
        what = f"a block end of the doubling {sorted(ends)}"
    else:
        ends, what = set(design.looks), "a look of the design"
    start = 0 if not base.get("results_from_cache") else None
    for lo, hi in blocks:
        if (start is not None and lo != start) or not lo < hi:
            found.differ("baseline.final_blocks", f"[{lo}, {hi}) does not follow on from "
                                                  f"the windows held before it ({start})")
            return
        if hi not in ends:
            found.differ("baseline.final_blocks", f"[{lo}, {hi}) ends at {hi}, which is not "
                                                  f"{what}")
            return
        start = hi
    used = len(win["final"].get("subject") or [])
    if blocks and not base.get("results_from_cache") and blocks[-1][1] < used:
        found.differ("baseline.final_blocks", f"the baseline was scored on {blocks[-1][1]} "
                                              f"final windows, the subject on {used}")
