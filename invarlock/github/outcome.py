"""What one certification produced, whatever happened: a verdict with its certificate, or an
error. Everything the Action reports (outputs, summary, check run, comment) is derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock.enums import StrEnum, Verdict

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_EVIDENCE = 0, 1, 2, 3


class Conclusion(StrEnum):
    """Check-run conclusions the Action uses (a subset of GitHub's)."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # the certifier itself errored: no verdict either way


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    verdict: Verdict | None  # None when the certifier errored
    certificate: dict[str, Any] | None
    certificate_path: Path | None
    markdown_path: Path | None
    error: str | None = None

    @classmethod
    def failed(cls, exit_code: int, error: str) -> Outcome:
        """An error before or instead of a verdict (exit 2 bad input, 3 no evidence)."""
        return cls(exit_code, None, None, None, None, error)

    @property
    def conclusion(self) -> Conclusion:
        if self.verdict is Verdict.PASS:
            return Conclusion.SUCCESS
        if self.verdict is Verdict.FAIL:
            return Conclusion.FAILURE
        return Conclusion.NEUTRAL

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
        }


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))
