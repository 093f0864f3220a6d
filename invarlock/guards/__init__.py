"""Guards: checks that compare the subject with its baseline beyond the primary metric.

The chain runs `invariants → spectral → rows → rmt → variance → invariants` (configurable with
`guards.order`); each guard's `mode` (off | monitor | gate) comes from the tier. Every guard
that runs writes `cert["guards"][name]` and `cert["validation"][flag]`; only flags of guards
in `gate` mode are listed in `cert["gating"]` and decide the verdict.

Certificate section of a guard (the same shape for plugins):

    {"mode": "gate" | "monitor", "flag": "spectral_stable", "passed": true,
     "reason": "one sentence", "measurements": {... everything decide needs ...},
     "findings": [{"module": "...", "family": "attn", "kind": "...", "message": "..."}],
     "summary": {... derived numbers, recomputed by decide ...}}          # optional

Guard protocol (`invarlock.guards.base.Guard`), for built-ins and third-party guards:

    name      identifier; the section name and `guards.<name>` policy key
    flag      the validation flag it sets, unique among guards
    stages    when its probe measures: structure | weights | activations | end
    measures  one line saying what it measures, for listings
    decide(measurements, policy) -> GuardDecision
              PURE (numpy only, no torch, no I/O): `invarlock verify` re-runs it on the
              stored measurements with the recorded policy (`recheck` below)
    probe(policy) -> invarlock.guards.measure.probe.Probe
              the torch side: lifecycle hooks called by the pipeline (baseline_loaded,
              taps, baseline_state [cached with the baseline's results], subject_loaded,
              measure [returns the JSON measurements]). Taps only observe.

A package adds a guard by exposing an object that follows the protocol under the entry-point
group `invarlock.guards` (`ENTRY_POINT_GROUP`); the loader passes it to `register`. Its
thresholds live under `guards.<name>` in tiers and presets (`mode` included), and they are
recorded in the certificate's resolved policy like the built-ins'.

Re-check without models: `recheck(name, section, policy_values)` recomputes the flag and its
reason from `section["measurements"]` and `cert["policy"]["values"]["guards"][name]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock.gate import Check
from invarlock.guards.base import Guard, GuardDecision, Stage
from invarlock.guards.chain import CANONICAL_ORDER, ChainSettings
from invarlock.guards.registry import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    UnknownGuardError,
    get_guard,
    guard_names,
    register,
    unregister,
)

__all__ = ["BUILTIN", "CANONICAL_ORDER", "ENTRY_POINT_GROUP", "ChainSettings", "Guard",
           "GuardDecision", "Stage", "UnknownGuardError", "get_guard", "guard_names",
           "recheck", "register", "unregister"]


def recheck(name: str, section: Mapping[str, Any], policy_values: Mapping[str, Any]) -> Check:
    """Recompute a guard's flag and reason from its stored section and recorded policy.

    Raises UnknownGuardError ("cannot re-check guard X (not installed)") for a guard whose
    implementation is not installed.
    """
    try:
        guard = get_guard(name)
    except UnknownGuardError:
        raise UnknownGuardError(f"cannot re-check guard {name} (not installed)") from None
    decision = guard.decide(section["measurements"], policy_values)
    return Check(guard.flag, bool(decision.passed), decision.reason)
