"""What an edit hands to the certifier: the plan it ran and what it touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EditResult:
    """Outcome of an in-memory edit, recorded in the certificate.

    `params_changed` counts the weight elements the edit rewrote (the sizes of the edited
    matrices); `max_abs_error` is the largest |W − Ŵ| over them, a diagnostic only.
    """

    name: str
    plan: dict[str, Any]
    modules_changed: tuple[str, ...]
    params_changed: int
    max_abs_error: float
