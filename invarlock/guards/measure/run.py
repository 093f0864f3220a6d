"""One certification's guard chain on the torch side: probes, taps, timing, decisions.

`GuardRun` is what `invarlock.certify` talks to. It binds the active guards' probes to the
run, collects their taps for each evaluation pass, keeps the baseline states that go into the
baseline cache, enforces the fatal `pre` invariants, and finally asks each guard's pure
`decide` for its section, in chain order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from invarlock.guards.base import Stage, not_measured
from invarlock.guards.chain import ChainSettings, GuardOutcome, evaluate, gating_flags
from invarlock.guards.measure.probe import Probe, RunInfo, SubjectContext
from invarlock.guards.registry import get_guard
from invarlock.host_memory import trim_host_memory

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def head(windows: Any, k: int) -> Any:
    """The first `k` windows of a WindowSet (the calibration windows of the final set)."""
    def cut(a: Any) -> Any:
        return None if a is None else a[:k]

    return dataclasses.replace(
        windows, name=f"{windows.name}[:{k}]", window_ids=windows.window_ids[:k],
        input_ids=windows.input_ids[:k], attention_mask=windows.attention_mask[:k],
        labels=cut(windows.labels), token_type_ids=cut(windows.token_type_ids),
        sha256=tuple(windows.sha256[:k]))


class GuardRun:
    """The active guards of one run and their probes."""

    def __init__(self, settings: ChainSettings, policy: Mapping[str, Any], info: RunInfo):
        self.settings = settings
        self.policy = {name: dict(policy.get(name) or {}) for name in settings.active}
        self.info = info
        self.probes: dict[str, Probe] = {}
        for name in settings.active:
            probe = get_guard(name).probe(self.policy[name])
            probe.bind(info)
            self.probes[name] = probe
        self.baseline: dict[str, dict[str, Any]] = {}
        self.fatal: str | None = None  # the guard whose fatal check failed
        self._early: dict[str, dict[str, Any]] = {}
        self._seconds: dict[str, float] = dict.fromkeys(self.probes, 0.0)

    # --- baseline ---------------------------------------------------------------------

    def _timed(self, name: str, fn: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._seconds[name] += time.perf_counter() - started

    def _settings_of(self, name: str) -> dict[str, Any]:
        settings = {"format": CACHE_FORMAT,
                    "calibration_windows": int(self.info.calibration_ids.size),
                    "seed": self.info.seed, **dict(self.probes[name].cache_settings)}
        if settings.get("fit") == "preview":  # a state summed over the preview windows
            settings["preview_windows"] = int(self.info.preview_ids.size)
        return settings

    def restore(self, payload: Mapping[str, Any] | None) -> bool:
        """Take the baseline states from a cache payload; False if any is missing or stale."""
        payload = payload or {}
        states = {}
        for name in self.probes:
            entry = payload.get(name)
            if not isinstance(entry, Mapping) or entry.get("settings") != self._settings_of(name):
                return False
            states[name] = dict(entry.get("state") or {})
        self.baseline = states
        return True

    def _weights_stage(self, name: str, fn: Any, *args: Any) -> Any:
        """A probe's work on whole weights, then the heap's free pages handed back: matrix
        copies freed on worker threads stay in their threads' heaps otherwise, and the next
        probe's copies come on top (`invarlock.host_memory`)."""
        try:
            return self._timed(name, fn, *args)
        finally:
            self._timed(name, trim_host_memory)

    def baseline_loaded(self, model: Any) -> None:
        for name, probe in self.probes.items():
            self._weights_stage(name, probe.baseline_loaded, model)

    def taps(self, model: Any, role: str, phase: str) -> list[Any]:
        if self.fatal is not None:
            return []
        out: list[Any] = []
        for name, probe in self.probes.items():
            out += self._timed(name, probe.taps, model, role, phase)
        return out

    def baseline_done(self) -> dict[str, Any]:
        """Collect the baseline states (also kept for this run); the cache payload."""
        self.baseline = {name: self._timed(name, probe.baseline_state)
                         for name, probe in self.probes.items()}
        return {name: {"settings": self._settings_of(name), "state": state}
                for name, state in self.baseline.items()}

    # --- subject ----------------------------------------------------------------------

    def subject_loaded(self, ctx: SubjectContext) -> bool:
        """Pre-evaluation measurements; False when a fatal check (the invariants) fails."""
        for name, probe in self.probes.items():
            self._weights_stage(name, probe.subject_loaded, ctx, self.baseline.get(name, {}))
            early = probe.fatal_check()
            if early is None:
                continue
            decision = get_guard(name).decide(early, self.policy[name])
            if not decision.passed:
                self.fatal = name
                self._early[name] = early
                log.warning("%s failed before evaluation (fatal): %s", name, decision.reason)
                return False
        return True

    def finish(self, ctx: SubjectContext) -> list[GuardOutcome]:
        """Measure every active guard, then decide them in chain order.

        Guards that check the end state (`Stage.END`: the invariants' fingerprint of the
        subject) measure after every other guard, so a pass that touches the subject after
        evaluation (the VE gate's extra forward) is covered by the last check.
        """
        measured: dict[str, Any] = {}
        last = [n for n in self.settings.active if Stage.END in get_guard(n).stages]
        first = [n for n in self.settings.active if n not in last]
        for name in [*first, *last]:
            probe = self.probes[name]
            started = time.perf_counter()
            if name in self._early:
                measured[name] = self._early[name]
            elif self.fatal is not None:
                measured[name] = not_measured(f"the {self.fatal} guard failed before "
                                              "evaluation (fatal)")
            else:
                measured[name] = probe.measure(ctx, self.baseline.get(name, {}))
            self._seconds[name] += time.perf_counter() - started
        outcomes = []
        for name in self.settings.active:
            started = time.perf_counter()
            outcomes.append(evaluate(name, self.settings.modes[name], measured[name],
                                     self.policy[name]))
            self._seconds[name] += time.perf_counter() - started
        return outcomes

    def timings(self) -> dict[str, float]:
        return {f"guard_{name}_s": round(self._seconds[name] + probe.seconds, 4)
                for name, probe in self.probes.items()}

    @staticmethod
    def gating(outcomes: list[GuardOutcome]) -> list[str]:
        return gating_flags(outcomes)


def run_info(kind: Any, device: str, plan: Any, settings: ChainSettings, policy: Any,
             preview_n: int | None = None) -> RunInfo:
    """`preview_n`: the preview windows the run scores (a sequential design's cut; all of
    them by default)."""
    k = min(settings.calibration_windows, plan.final.n)
    return RunInfo(kind=kind, device=device, seed=int(plan.seed),
                   preview_ids=np.asarray(plan.preview.window_ids[:preview_n], dtype=np.int64),
                   calibration_ids=np.asarray(plan.final.window_ids[:k], dtype=np.int64),
                   replicates=int(policy.bootstrap.replicates),
                   ci_alpha=float(policy.bootstrap.alpha),
                   bootstrap_seed=int(policy.bootstrap.seed),
                   tokens_seen=plan.tokens_seen())
