"""One exception tree for the whole package.

Each class carries the process exit code that the CLI (and the Action entrypoint) apply;
library code raises, only those two edges catch and exit. Foreign exceptions (torch, HF,
HTTP, YAML) are translated into these at exactly one place each.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class InvarlockError(Exception):
    """Root of every error the tool reports to a user as one clear line."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InputError(InvarlockError):
    """Bad input or configuration: a path, a flag, a key, a value (exit 2)."""

    exit_code = 2


class ConfigError(InputError):
    """A config, preset or policy file is malformed or names an unknown key (exit 2)."""


class MissingExtraError(InputError):
    """A command needs an optional dependency set that is not installed (exit 2)."""

    def __init__(self, feature: str, extra: str = "hf") -> None:
        super().__init__(
            f"{feature} needs the '{extra}' extra, which is not installed",
            hint=f'pip install "invarlock[{extra}]"',
        )
        self.extra = extra


class EvidenceError(InvarlockError):
    """The evidence cannot be produced: pairing, coverage, tokenizer mismatch (exit 3)."""

    exit_code = 3


class TamperedCertificateError(InputError):
    """A certificate fails its own checks: schema, digest, or recomputed numbers (exit 2)."""


def nearest_hint(name: str, known: Sequence[str], listing: str = "valid keys") -> str:
    """"; did you mean 'x'?" for a near miss, else the list of what is known (for messages)."""
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else f"; {listing}: {', '.join(known)}"
