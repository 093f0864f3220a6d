"""The guard chain's settings and its contribution to the verdict (pure: no torch, no I/O).

`ChainSettings.from_policy` reads `values.guards` of the resolved policy: the order, each
guard's mode and the number of calibration windows K. `evaluate` turns a guard's
measurements into its certificate section and its `validation` check; `gating_flags` names
the flags of guards in `gate` mode.

The order decides which guards run (a guard not listed does not), the order of their
sections and decisions, and so which guard's failure is reported first. Measuring happens
when the data exists whatever the order: structure and weights when the subject loads,
activations during the evaluation passes, fingerprints at the end; a failed fatal check
(the invariants, before evaluation) leaves the other guards unmeasured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from invarlock.enums import GuardMode
from invarlock.errors import ConfigError, nearest_hint
from invarlock.gate import Check
from invarlock.guards.registry import get_guard, guard_names

CANONICAL_ORDER = ("invariants", "spectral", "rows", "rmt", "variance", "invariants")
# Keys of `values.guards` that are chain settings, not guard names.
CHAIN_KEYS = ("order", "calibration_windows")


@dataclass(frozen=True)
class ChainSettings:
    order: tuple[str, ...]             # as configured (invariants may appear first and last)
    modes: dict[str, GuardMode]        # every guard named in the order
    calibration_windows: int           # K: RMT windows and VE gate windows

    @property
    def active(self) -> tuple[str, ...]:
        """Guards that run (mode not off), each once, in order of first appearance."""
        seen: list[str] = []
        for name in self.order:
            if name not in seen and self.modes[name] is not GuardMode.OFF:
                seen.append(name)
        return tuple(seen)

    @classmethod
    def from_policy(cls, guards: Mapping[str, Any] | None) -> ChainSettings:
        guards = dict(guards or {})
        order = tuple(guards.get("order", CANONICAL_ORDER))
        known = guard_names()
        for key in guards:
            if key not in CHAIN_KEYS and key not in known:
                hint = nearest_hint(key, known, "known guards")
                raise ConfigError(f"unknown guard '{key}'{hint}")
        for name in order:
            if name not in known:
                hint = nearest_hint(name, known, "known guards")
                raise ConfigError(f"guards.order: unknown guard '{name}'{hint}")
        repeated = sorted({n for n in order if order.count(n) > 1} - {"invariants"})
        if repeated:
            raise ConfigError(f"guards.order lists {', '.join(repeated)} more than once "
                              "(only invariants runs twice: first and last)")
        modes = {}
        for name in order:
            section = guards.get(name) or {}
            raw = section.get("mode", "off") if isinstance(section, Mapping) else "off"
            raw = "off" if raw is False else raw  # YAML 1.1 reads a bare `off` as false
            try:
                modes[name] = GuardMode(raw)
            except ValueError:
                raise ConfigError(f"guards.{name}.mode must be off, monitor or gate, "
                                  f"got {raw!r}") from None
        k = int(guards.get("calibration_windows", 16))
        if k < 2:
            raise ConfigError(f"guards.calibration_windows must be at least 2, got {k}")
        return cls(order, modes, k)


@dataclass(frozen=True)
class GuardOutcome:
    """One guard's part of the certificate."""

    name: str
    flag: str
    mode: GuardMode
    section: dict[str, Any]
    check: Check


def evaluate(name: str, mode: GuardMode, measurements: Mapping[str, Any],
             policy: Mapping[str, Any]) -> GuardOutcome:
    """Decide one guard and build its certificate section."""
    guard = get_guard(name)
    decision = guard.decide(measurements, policy)
    section = {"mode": str(mode), "flag": guard.flag, "passed": bool(decision.passed),
               "reason": decision.reason, "measurements": dict(measurements),
               "findings": [dict(f) for f in decision.findings]}
    if decision.summary:
        section["summary"] = decision.summary
    return GuardOutcome(name, guard.flag, mode, section,
                        Check(guard.flag, bool(decision.passed), decision.reason))


def gating_flags(outcomes: list[GuardOutcome]) -> list[str]:
    """Flags of guards in gate mode (the primary flags are added by the caller)."""
    return [o.flag for o in outcomes if o.mode is GuardMode.GATE]
