"""What every rendering says about a sequential run: where it stopped, its looks, and why.

The certificate's `sequential` section records the design and every look (see
`invarlock.sequential_run.section`). Markdown, the HTML report, the pull request comment,
the check run, the matrix aggregate, the multi-subject index and the CLI all need the same
few facts from it — "decided after N of M windows", the looks as rows, the threshold and
the reason the run stopped — so they come from here, worded once.

Pure: a certificate dict in, a frozen view of plain text and numbers out. Nothing is
escaped here: a certificate is untrusted, and every renderer escapes for its own medium.
A section whose fields do not have the recorded types gives no view (renderers then show
no sequential facts; `verify` reports such a certificate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DECISIONS = ("pass", "fail", "continue", "nonfinite")
_LOOK_DECISIONS = ("pass", "fail", "continue")


@dataclass(frozen=True)
class LookRow:
    """One look: the first `windows` differences, their mean and the sequence's bounds."""

    number: int  # 1-based, in evaluation order
    windows: int
    mean: float
    low: float
    high: float
    decision: str  # pass | fail | continue


@dataclass(frozen=True)
class SequentialView:
    """The facts of one sequential run, in the certificate's own units (the difference
    scale: nats/token for perplexity, negated percentage points for accuracy)."""

    evaluated: int  # final windows evaluated (where the run stopped)
    maximum: int  # the planned maximum (the profile's final_n)
    decision: str  # pass | fail | continue (ran to the maximum) | nonfinite
    early: bool  # a look decided PASS or FAIL
    threshold: float  # ln(ratio limit), or −(minimum accuracy change) in pp
    accuracy: bool
    looks: tuple[LookRow, ...]
    planned: tuple[int, ...]  # every look the design allowed
    alpha: float
    alpha_boundary: float  # per side, for the confidence sequence
    alpha_fixed: float  # two-sided, for the fixed-design interval at the maximum
    share: float
    n_min: int
    step: int
    sd_floor: float

    @property
    def windows(self) -> str:
        """Compact "evaluated/maximum", e.g. "32/200" (a table cell)."""
        return f"{self.evaluated}/{self.maximum}"

    @property
    def phrase(self) -> str:
        """"decided after 32 of 200 windows (PASS)", or how else the run ended."""
        return phrase(self.evaluated, self.maximum, self.decision)

    @property
    def limit_text(self) -> str:
        """The threshold as the limit it stands for."""
        if self.accuracy:
            return f"the accuracy limit {-self.threshold:+.2f} pp"
        return f"ln {math.exp(self.threshold):.2f} = {self.threshold:+.6f}"

    @property
    def deciding(self) -> LookRow | None:
        """The look that decided, when one did."""
        return self.looks[-1] if self.early and self.looks else None

    @property
    def why(self) -> str:
        """Why the run stopped where it did, in one sentence."""
        look = self.deciding
        unit = "pp (negated)" if self.accuracy else "nats/token"
        if look is not None and self.decision == "pass":
            return (f"At look {look.number} ({look.windows} windows) the upper bound "
                    f"{look.high:+.6f} {unit} was below {self.limit_text} (a PASS needs "
                    f"at least {self.n_min} windows).")
        if look is not None and self.decision == "fail":
            return (f"At look {look.number} ({look.windows} windows) the lower bound "
                    f"{look.low:+.6f} {unit} was above {self.limit_text}.")
        if self.decision == "nonfinite":
            return (f"A window's subject loss was not finite after {self.evaluated} "
                    "windows, before any look decided.")
        return (f"No look decided: at each of the {len(self.looks)} looks the interval "
                f"still held {self.limit_text}, so the fixed-design interval at "
                f"α = {self.alpha_fixed:g} decided on all {self.maximum} windows.")

    @property
    def design_text(self) -> str:
        """The pre-registered design in one sentence."""
        return (f"Confidence sequence at α = {self.alpha_boundary:g} per side "
                f"({self.share:g} of α = {self.alpha:g}), fixed interval at α = "
                f"{self.alpha_fixed:g}; n_min {self.n_min}, looks every {self.step} windows "
                f"up to {self.maximum}; σ̂ floor {self.sd_floor:.6f} (preview set).")


def phrase(evaluated: int, maximum: int, decision: str) -> str:
    """How a sequential run ended, in the words every rendering uses."""
    if decision in ("pass", "fail"):
        return f"decided after {evaluated} of {maximum} windows ({decision.upper()})"
    if decision == "nonfinite":
        return f"stopped after {evaluated} of {maximum} windows on non-finite outputs"
    return (f"ran to the maximum of {maximum} windows undecided; the fixed-design "
            "interval decided")


def final_windows(cert: Mapping[str, Any]) -> tuple[int, int] | None:
    """(final windows evaluated, planned) of any certificate: where a sequential run stopped,
    or how many final windows a fixed run scored (0 when the preview stopped it); None when
    the certificate does not say."""
    seq = view(cert)
    if seq is not None:
        return seq.evaluated, seq.maximum
    windows = cert.get("windows")
    final = windows.get("final") if isinstance(windows, Mapping) else None
    if not isinstance(final, Mapping):
        return None
    scored, ids = final.get("subject"), final.get("ids")
    if not isinstance(scored, list) or not isinstance(ids, list):
        return None
    return len(scored), len(ids)


def view(cert: Mapping[str, Any]) -> SequentialView | None:
    """The certificate's sequential facts; None without a section or with a malformed one."""
    seq = cert.get("sequential")
    if not isinstance(seq, Mapping):
        return None
    try:
        return _view(seq, _is_accuracy(cert))
    except (KeyError, TypeError, ValueError):
        return None


def _view(seq: Mapping[str, Any], accuracy: bool) -> SequentialView:
    design = seq["design"]
    decision = _choice(seq["decision"], DECISIONS)
    looks = tuple(LookRow(i, _int(lk["windows"]), _num(lk["mean"]), _num(lk["low"]),
                          _num(lk["high"]), _choice(lk["decision"], _LOOK_DECISIONS))
                  for i, lk in enumerate(seq["looks"], 1))
    return SequentialView(
        evaluated=_int(seq["stopped_at"]), maximum=_int(design["n_max"]), decision=decision,
        early=decision in ("pass", "fail"), threshold=_num(seq["threshold"]),
        accuracy=accuracy, looks=looks,
        planned=tuple(_int(t) for t in seq["looks_planned"]),
        alpha=_num(design["alpha"]), alpha_boundary=_num(design["alpha_boundary"]),
        alpha_fixed=_num(design["alpha_fixed"]), share=_num(design["share"]),
        n_min=_int(design["n_min"]), step=_int(design["step"]), sd_floor=_num(seq["sd_floor"]))


def _is_accuracy(cert: Mapping[str, Any]) -> bool:
    windows = cert.get("windows")
    return isinstance(windows, Mapping) and windows.get("kind") == "accuracy"


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return float(value)


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"expected one of {allowed}")
    return str(value)
