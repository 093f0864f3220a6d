"""What a verification found: the report, the collector the checks write into, and the
tolerant structural comparison they all use.

Kept apart from the checks so every section of `invarlock.verification` records a difference
the same way, and a number within tolerance agrees the same way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

REL_TOL = 1e-12
ABS_TOL = 1e-15
SETS = ("preview", "final")
_MAX_ITEMS_SHOWN = 3  # per array, differences beyond this are counted, not listed


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of re-checking one certificate."""

    verdict: str | None  # the certificate's own verdict, when it could be read
    differences: tuple[str, ...]  # one line per mismatch; empty when everything matches
    notes: tuple[str, ...]  # facts a reviewer should see that do not fail verification
    checked: tuple[str, ...]  # the groups of checks that ran

    @property
    def verified(self) -> bool:
        return not self.differences

    @property
    def exit_code(self) -> int:
        """0 verified PASS, 1 verified FAIL, 2 tampered or malformed."""
        if not self.verified:
            return 2
        return 0 if self.verdict == "PASS" else 1

    def as_dict(self) -> dict[str, Any]:
        return {"verified": self.verified, "verdict": self.verdict,
                "differences": list(self.differences), "notes": list(self.notes),
                "checked": list(self.checked), "exit_code": self.exit_code}


class Findings:
    """Collects differences and notes while the checks run."""

    def __init__(self) -> None:
        self.differences: list[str] = []
        self.notes: list[str] = []
        self.checked: list[str] = []

    def differ(self, where: str, message: str) -> None:
        self.differences.append(f"{where}: {message}")

    def compare(self, where: str, stored: Any, recomputed: Any) -> None:
        """Record every leaf where `stored` and `recomputed` disagree."""
        for path, message in diff(where, stored, recomputed):
            self.differ(path, message)

    def report(self, verdict: str | None) -> VerifyReport:
        """The findings so far, frozen into the report `verify` returns."""
        return VerifyReport(verdict, tuple(self.differences), tuple(self.notes),
                            tuple(self.checked))


# --- structural comparison with tolerance ---------------------------------------------------

def diff(path: str, stored: Any, recomputed: Any) -> Iterator[tuple[str, str]]:
    """(path, message) for each leaf that disagrees; numbers within REL_TOL/ABS_TOL agree."""
    if isinstance(recomputed, Mapping):
        if not isinstance(stored, Mapping):
            yield path, f"certificate has {_show(stored)}, recomputed a section"
            return
        for key in sorted(set(stored) | set(recomputed), key=str):
            sub = f"{path}.{key}"
            if key not in stored:
                yield sub, f"missing, recomputed {_show(recomputed[key])}"
            elif key not in recomputed:
                yield sub, f"certificate has {_show(stored[key])}, which recomputation does not"
            else:
                yield from diff(sub, stored[key], recomputed[key])
        return
    if isinstance(recomputed, (list, tuple)):
        if not isinstance(stored, (list, tuple)) or len(stored) != len(recomputed):
            yield path, f"certificate has {_show(stored)}, recomputed {_show(recomputed)}"
            return
        shown = 0
        for i, (a, b) in enumerate(zip(stored, recomputed, strict=True)):
            for item in diff(f"{path}[{i}]", a, b):
                if shown < _MAX_ITEMS_SHOWN:
                    yield item
                shown += 1
        return
    if not _same_leaf(stored, recomputed):
        yield path, f"certificate has {_show(stored)}, recomputed {_show(recomputed)}"


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or (type(a) is type(b) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if not (math.isfinite(a) and math.isfinite(b)):
            return a == b
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return type(a) is type(b) and a == b


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return f"{len(value)} entries" if len(value) > 4 else repr(list(value))
    if isinstance(value, Mapping):
        return "a section"
    return repr(value)
