"""Preflight: what would stop a run, found before any model is evaluated.

`diagnose` walks the same road as `certify`/`run` (config files and flags merged, policy
resolved, models resolved) but reads models only as metadata (config.json, safetensors
headers), tokenizes the corpus and plans the windows without a model, and checks the device
and its free memory. Each problem becomes a `Finding` with a stable code; the run would fail
exactly when there is an ERROR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invarlock.doctor.findings import CODES, Finding, Severity

FORMAT_VERSION = 1

__all__ = ["CODES", "FORMAT_VERSION", "DoctorResult", "Finding", "Severity", "diagnose"]


@dataclass
class DoctorResult:
    """Findings in the order the checks ran, and what the run would resolve to."""

    findings: list[Finding] = field(default_factory=list)
    policy: dict[str, Any] | None = None
    resolution: dict[str, Any] = field(default_factory=dict)

    def add(self, code: str, message: str, hint: str | None = None) -> None:
        self.findings.append(Finding(code, message, hint))

    def count(self, severity: Severity) -> int:
        return sum(f.severity is severity for f in self.findings)

    @property
    def ok(self) -> bool:
        return self.count(Severity.ERROR) == 0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 2

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.count(Severity.ERROR),
                "warnings": self.count(Severity.WARNING), "notes": self.count(Severity.NOTE)}

    def text(self) -> str:
        s = self.summary()
        lines = [f.line() for f in self.findings]
        lines.append(f"doctor: {s['errors']} error(s), {s['warnings']} warning(s), "
                     f"{s['notes']} note(s)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "summary": self.summary(),
                "findings": [f.as_dict() for f in self.findings], "policy": self.policy,
                "resolution": self.resolution}


def diagnose(*, configs: Sequence[str | Path] = (), flags: dict[str, Any] | None = None,
             ) -> DoctorResult:
    """Run every preflight check for the run these config files and flags describe."""
    from invarlock.doctor import checks

    result = DoctorResult()
    checks.network(result)
    config = checks.configuration(result, list(configs), dict(flags or {}))
    if config is None:
        return result
    checks.run_setup(result, config)
    return result
