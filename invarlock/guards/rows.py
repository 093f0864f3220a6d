"""Rows guard: did any row of an embedding, an output head, a norm or a bias change?

The evaluation text never covers a 50k–256k vocabulary, and σ_max, the activation guards and
the perplexity on the windows are all blind to a row that no window reads: permuting,
zeroing or spiking the embedding rows of unseen tokens (tied with the head or not), or
rescaling a final norm that no later matrix absorbs, passes every other check. This guard
compares every tensor outside the block matrices row by row:

- 2-D tensors (token/position embeddings, untied output heads, classifiers, poolers): the
  relative change of each row, ‖s_i − b_i‖ / max(‖b_i‖, ρ·rms_j ‖b_j‖);
- 1-D tensors (norm scales and shifts, biases): the same per channel (rows of length 1);
- a norm whose scale the matrices it feeds absorb (SmoothQuant/AWQ fold (γ, β)/s into
  W·diag(s)) is compared through what the function depends on, (γ_i + offset)·‖W[:, i]‖
  and β_i·‖W[:, i]‖ over the linears it feeds; a head those norms feed, as W·diag(γ).

The probe counts the rows whose change exceeds τ (`tau`, calibrated: policies/CALIBRATION.md)
and keeps the largest; rows of tokens the evaluation windows never contain are counted
separately (their damage is invisible to the primary metric). A tensor fails when the share
of its rows beyond τ exceeds `max_share`. The probe counts at the τ it was given; a policy
whose τ differs from the measured one cannot be decided from these measurements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from invarlock.guards.base import BuiltinGuard, GuardDecision, Stage, unmeasured_decision

NAME = "rows"
FLAG = "rows_stable"


def share_beyond(tensor: Mapping[str, Any]) -> float:
    """Share of a tensor's rows whose relative change exceeds τ."""
    rows = int(tensor["rows"])
    beyond = int(tensor["beyond"]["seen"]) + int(tensor["beyond"]["unseen"])
    return beyond / rows if rows else 0.0


def max_change(tensor: Mapping[str, Any]) -> float:
    """The largest relative change of a tensor's rows (stored None: not finite)."""
    value = tensor["max_change"]
    return float("inf") if value is None else float(value)


def decide(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> GuardDecision:
    """Fail every tensor whose share of rows beyond τ exceeds `max_share`."""
    skipped = unmeasured_decision(measurements)
    if skipped is not None:
        return skipped
    tau, max_share = float(policy["tau"]), float(policy["max_share"])
    measured_tau = float(measurements["tau"])
    if measured_tau != tau:
        return GuardDecision(False, f"rows were counted at τ = {measured_tau:g}, the policy "
                                    f"says τ = {tau:g}: not decidable from these measurements")
    tensors = list(measurements["tensors"])
    if not tensors:
        return GuardDecision(False, "not measured: no embedding, head, norm or bias matched")
    failing = [t for t in tensors if share_beyond(t) > max_share]
    findings = [_finding(t, tau) for t in failing]
    vocab = measurements.get("vocabulary") or {}
    summary = {
        "tensors": len(tensors), "changed": sum(1 for t in tensors if t["changed"]),
        "failing": len(failing),
        "rows_beyond": sum(int(t["beyond"]["seen"]) + int(t["beyond"]["unseen"])
                           for t in tensors),
        "unseen_rows_beyond": sum(int(t["beyond"]["unseen"]) for t in tensors),
        "max_change": _json(max(max_change(t) for t in tensors)),
        "vocabulary_coverage": vocab.get("coverage"),
    }
    if failing:
        worst = max(failing, key=share_beyond)
        unseen = sum(int(t["beyond"]["unseen"]) for t in failing)
        reason = (f"{len(failing)} tensor(s) with rows changed beyond τ = {tau:g} "
                  f"({summary['rows_beyond']} row(s), {unseen} of tokens the windows never "
                  f"contain); largest share: {worst['name']} {share_beyond(worst):.2%}")
        return GuardDecision(False, reason, tuple(findings), summary)
    top = max(tensors, key=max_change)
    reason = (f"{len(tensors)} tensors, no row changed beyond τ = {tau:g} "
              f"(largest change {max_change(top):.3g} in {top['name']})")
    return GuardDecision(True, reason, (), summary)


def _finding(t: Mapping[str, Any], tau: float) -> dict[str, Any]:
    seen, unseen = int(t["beyond"]["seen"]), int(t["beyond"]["unseen"])
    what = "channel(s)" if t["kind"] != "rows" else "row(s)"
    split = f" ({unseen} of tokens the windows never contain)" if t.get("vocabulary") else ""
    return {"module": t["name"], "family": t["family"], "kind": "violation",
            "message": (f"{seen + unseen} of {t['rows']} {what} changed by more than τ = "
                        f"{tau:g}{split}; largest {max_change(t):.3g}"),
            "share": share_beyond(t), "top": list(t.get("top") or [])}


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None


ROWS = BuiltinGuard(
    NAME, FLAG, (Stage.WEIGHTS,),
    measures=("relative change of every row of the embeddings and heads and of every channel "
              "of the norms and biases, baseline (streamed from its files) vs subject; rows of "
              "tokens the windows never contain counted apart"),
    decide_fn=decide, probe_path="invarlock.guards.measure.rows:RowsProbe")
