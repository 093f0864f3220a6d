"""What every guard is: a name, a validation flag, a measurement and a pure decision.

A guard is split in two so that its verdict can be recomputed from a certificate alone:

- a *probe* (torch side, `invarlock.guards.measure`) observes the baseline and the subject
  while the pipeline runs and returns plain JSON measurements;
- `decide(measurements, policy)` (numpy only, no I/O) turns those measurements and the
  guard's policy values into a `GuardDecision`. `invarlock verify` calls the same `decide`
  on the measurements stored in the certificate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable


class Stage(str, Enum):
    """When a guard's probe measures (documentation and `invarlock plugins guards`)."""

    STRUCTURE = "structure"      # configs, parameter tables, tokenizers: before evaluation
    WEIGHTS = "weights"          # subject weights in memory vs baseline weights streamed from disk
    ACTIVATIONS = "activations"  # taps on the evaluation passes of both models
    END = "end"                  # after every evaluation (fingerprints, counters)

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class GuardDecision:
    """A guard's outcome: the flag value, one sentence why, the findings behind it.

    `summary` holds derived numbers worth showing (per-family maxima, intervals); it is
    recomputed by `decide`, never read back as input.
    """

    passed: bool
    reason: str
    findings: tuple[dict[str, Any], ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Guard(Protocol):
    """The public guard protocol (built-in guards and `invarlock.guards` entry points).

    name      registry key and certificate section name (`cert["guards"][name]`)
    flag      the `validation` flag it sets (`spectral_stable`, ...)
    stages    when its probe measures
    measures  one line: what it measures, for listings
    decide    pure: measurements + policy values → GuardDecision (numpy only)
    probe     builds the torch-side measurement object for one run: an
              `invarlock.guards.measure.probe.Probe`, typed loosely here so that the
              decision side never imports the measurement side
    """

    name: str
    flag: str
    stages: tuple[Stage, ...]
    measures: str

    def decide(self, measurements: Mapping[str, Any],
               policy: Mapping[str, Any]) -> GuardDecision: ...

    def probe(self, policy: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True)
class BuiltinGuard:
    """A built-in guard: its pure decision and where its probe lives.

    The probe is imported only when a run needs it, so deciding (and `verify`) needs no torch.
    """

    name: str
    flag: str
    stages: tuple[Stage, ...]
    measures: str
    decide_fn: Callable[[Mapping[str, Any], Mapping[str, Any]], GuardDecision]
    probe_path: str  # "module:Class" under invarlock.guards.measure

    def decide(self, measurements: Mapping[str, Any],
               policy: Mapping[str, Any]) -> GuardDecision:
        return self.decide_fn(measurements, policy)

    def probe(self, policy: Mapping[str, Any]) -> Any:
        module, _, cls = self.probe_path.partition(":")
        return getattr(importlib.import_module(module), cls)(policy)


def not_measured(why: str) -> dict[str, Any]:
    """Measurements of a guard that could not run in this certification (recorded, FAIL)."""
    return {"evaluated": False, "why": why}


def not_applicable(why: str) -> dict[str, Any]:
    """Measurements of a guard whose check does not exist for this kind of model (PASS)."""
    return {"evaluated": False, "applicable": False, "why": why}


def unmeasured_decision(measurements: Mapping[str, Any]) -> GuardDecision | None:
    """The decision for `not_measured`/`not_applicable` measurements, or None when the guard
    did measure. A guard that could not measure fails; one that does not apply passes."""
    if measurements.get("evaluated", True):
        return None
    why = measurements.get("why", "unknown reason")
    if measurements.get("applicable", True) is False:
        return GuardDecision(True, f"not applicable: {why}")
    return GuardDecision(False, f"not measured: {why}")
