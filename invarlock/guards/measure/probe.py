"""The measurement side of a guard: what a probe may observe, and when.

The pipeline drives every active guard's probe through the same lifecycle:

baseline (skipped when the baseline's results and guard states come from the cache)
    baseline_loaded(model)               the baseline is resident, before it is evaluated
    taps(model, "baseline", phase)       observing taps for its preview/final passes
    baseline_state() -> JSON             kept in the baseline cache with its results
subject
    subject_loaded(ctx)                  the subject is resident (nothing evaluated yet)
    fatal_check() -> JSON | None         decided at once; a failure stops the chain
    taps(model, "subject", phase)        observing taps for its preview/final passes
    measure(ctx) -> JSON                 the certificate's `measurements` for the guard

Taps only observe (see `invarlock.evaluate.Tap`). A probe that changes outputs to measure
something (the VE gate) does so in an extra forward pass it runs itself through
`SubjectContext.score`, on hooks it removes afterwards. Probes never write weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from invarlock.enums import MetricKind


@dataclass(frozen=True)
class RunInfo:
    """What every probe knows about the run before any model is loaded."""

    kind: MetricKind
    device: str
    seed: int                     # window seed: RMT row sampling
    preview_ids: np.ndarray       # int64: windows VE fits its proposal on
    calibration_ids: np.ndarray   # int64: the first K final windows (RMT, VE gate)
    replicates: int               # bootstrap settings for the VE gate's interval
    ci_alpha: float
    bootstrap_seed: int
    tokens_seen: np.ndarray | None = None  # int64, sorted: token ids the windows contain


@dataclass
class SubjectContext:
    """The subject and everything it is compared with, handed to probes."""

    info: RunInfo
    model: Any                                # torch.nn.Module, eval mode
    config: dict[str, Any]                    # subject config.json
    baseline_config: dict[str, Any]
    baseline_files: list[Path]                # the baseline checkpoint's weight files
    tokenizer_hashes: tuple[str, str]         # (baseline, subject)
    fingerprint: str | None = None            # subject tensor digest when already computed
    scores: dict[str, Any] = field(default_factory=dict)  # "preview"/"final": WindowScores
    calibration: Any = None                   # WindowSet of the calibration windows
    score: Callable[..., Any] | None = None    # score(model, windows) -> WindowScores
    base_model_prefix: str = ""


class Probe:
    """Base class: every lifecycle method is optional. Subclasses set `cache_settings`
    to everything their baseline state depends on beyond the baseline cache key."""

    cache_settings: Mapping[str, Any] = {}

    def __init__(self, policy: Mapping[str, Any]) -> None:
        self.policy = dict(policy)
        self.info: RunInfo | None = None
        self.seconds = 0.0  # time spent in taps (added to the guard's timing)

    def bind(self, info: RunInfo) -> None:
        self.info = info

    def baseline_loaded(self, model: Any) -> None:
        return None

    def taps(self, model: Any, role: str, phase: str) -> list[Any]:
        return []

    def baseline_state(self) -> dict[str, Any]:
        return {}

    def subject_loaded(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> None:
        return None

    def fatal_check(self) -> dict[str, Any] | None:
        """Measurements to decide right after `subject_loaded`; when the guard's decision on
        them fails, the chain stops (the invariants' pre-evaluation check). None: no such
        check."""
        return None

    def measure(self, ctx: SubjectContext, baseline: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError
