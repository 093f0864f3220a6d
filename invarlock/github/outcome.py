"""What one certification produced, whatever happened: a verdict with its certificate, or an
error. Everything the Action reports (outputs, summary, check run, comment) is derived from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock.enums import StrEnum, Verdict

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_EVIDENCE = 0, 1, 2, 3
# The Action's own defect (an exception it did not expect): never 0 (PASS), never 1 (FAIL,
# which `fail-on-gate: false` turns green), and not the certifier's 2 or 3.
EXIT_INTERNAL = 4
# Exit codes a report may record: anything else (256, -1, "0") is not a result.
KNOWN_EXIT_CODES = (EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_EVIDENCE)


class Conclusion(StrEnum):
    """Check-run conclusions the Action uses (a subset of GitHub's).

    Branch protection counts `success`, `neutral` and `skipped` as passing, so anything that
    is not a PASS (a FAIL, bad input, missing evidence, a crash, a missing report) concludes
    `failure`; only a run that was cancelled concludes `cancelled`. `neutral` is used only
    for a FAIL when the user asked for it (input `fail-conclusion: neutral`).
    """

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    verdict: Verdict | None  # None when the certifier errored
    certificate: dict[str, Any] | None
    certificate_path: Path | None
    markdown_path: Path | None
    error: str | None = None
    cancelled: bool = False  # stopped by a signal (job cancelled or timed out)

    @classmethod
    def failed(cls, exit_code: int, error: str) -> Outcome:
        """An error before or instead of a verdict (exit 2 bad input, 3 no evidence)."""
        return cls(exit_code, None, None, None, None, error)

    @classmethod
    def stopped(cls, signal_number: int) -> Outcome:
        """The run was cancelled: no verdict; the exit code is the shell's 128 + signal."""
        return cls(128 + signal_number, None, None, None, None,
                   f"cancelled (signal {signal_number}) before a verdict was reached",
                   cancelled=True)

    def conclusion(self, fail_conclusion: Conclusion = Conclusion.FAILURE) -> Conclusion:
        """The check run's conclusion; `fail_conclusion` applies to a FAIL verdict only."""
        if self.cancelled:
            return Conclusion.CANCELLED
        if self.verdict is Verdict.PASS and self.exit_code == EXIT_PASS:
            return Conclusion.SUCCESS
        if self.verdict is Verdict.FAIL:
            return fail_conclusion
        return Conclusion.FAILURE

    @property
    def primary_metric(self) -> dict[str, Any] | None:
        return None if self.certificate is None else self.certificate["primary_metric"]

    def outputs(self) -> dict[str, str]:
        """Step outputs; numbers as plain decimals, empty where there is nothing to report."""
        pm = self.primary_metric or {}
        ratio_ci = pm.get("ratio_ci")
        delta = pm.get("delta")
        lower = delta["ci"][0] if delta and pm.get("basis") == "delta_ci_lower" else None
        return {
            "verdict": "" if self.verdict is None else str(self.verdict),
            "exit-code": str(self.exit_code),
            "ratio": _number(pm.get("ratio")),
            "ratio-ci-upper": _number(ratio_ci[1] if ratio_ci else None),
            "delta-ci-lower": _number(lower),
            "limit": _number(pm.get("limit")),
            "certificate-path": "" if self.certificate_path is None else str(self.certificate_path),
            "report-path": "" if self.markdown_path is None else str(self.markdown_path),
            "error": self.error or "",
            "baseline-cache-key": baseline_cache_key(self.certificate),
        }


def baseline_cache_key(cert: dict[str, Any] | None) -> str:
    """A cache key for the baseline's results, for actions/cache across jobs.

    It names what the certifier's own cache key (invarlock.cache.CacheKey) is made of: the
    baseline weights, the tokenizer, the window plan, the metric, the dtype, the device type
    and the tool version; the jobs of one matrix that share all of them share the entry.
    """
    if cert is None:
        return ""
    parts = {
        "weights": cert["baseline"]["weights_digest"],
        "tokenizer": (cert.get("tokenizer") or {}).get("hash"),
        "plan": cert["windows"]["plan_digest"],
        "metric": cert["primary_metric"]["kind"],
        "dtype": cert["baseline"].get("dtype"),
        "device": ((cert.get("environment") or {}).get("device") or {}).get("type"),
        "tool": (cert.get("tool") or {}).get("version"),
    }
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return "invarlock-baseline-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]

def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))
