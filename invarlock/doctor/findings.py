"""Doctor findings: a severity, a stable code, one line, and an optional hint.

Codes never change meaning; new checks get new codes. The table is documented in
docs/cli.md ("invarlock doctor").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from invarlock.enums import StrEnum


class Severity(StrEnum):
    ERROR = "ERROR"  # the run would stop (exit 2 or 3) or produce no valid evidence
    WARNING = "WARNING"  # the run works but something deserves a look
    NOTE = "NOTE"  # what the run will use


# code -> (severity, what it means); the one place codes are defined.
CODES: dict[str, tuple[Severity, str]] = {
    "D001": (Severity.ERROR, "config file missing, unreadable or not a YAML mapping"),
    "D002": (Severity.ERROR, "unknown config key (the nearest valid key is named) or a value "
                             "of the wrong type"),
    "D003": (Severity.ERROR, "policy cannot be resolved: tier, profile or window rules"),
    "D004": (Severity.ERROR, "run cannot be assembled: nothing to compare, subject and edit "
                             "both given, no dataset, bad edit plan, save options without edit"),
    "D005": (Severity.NOTE, "resolved policy: tier, profile, windows, replicates, digest"),
    "D010": (Severity.ERROR, "baseline model cannot be resolved (missing directory, no "
                             "config.json, hub id offline and not cached, needs remote code)"),
    "D011": (Severity.ERROR, "subject model cannot be resolved (same reasons)"),
    "D012": (Severity.ERROR, "adapter cannot be determined, or baseline and subject need "
                             "different adapters"),
    "D013": (Severity.ERROR, "weights missing or refused (pickle without --allow-pickle, "
                             "broken shard index)"),
    "D014": (Severity.ERROR, "safetensors header unreadable"),
    "D015": (Severity.ERROR, "architecture or model_type differ between baseline and subject"),
    "D016": (Severity.ERROR, "parameter names or shapes differ between baseline and subject"),
    "D017": (Severity.ERROR, "config.json differs beyond dtype and quantization fields"),
    "D018": (Severity.NOTE, "model summary: architecture, adapter, parameters, weight bytes"),
    "D019": (Severity.WARNING, "baseline and subject weights are stored in different dtypes"),
    "D020": (Severity.ERROR, "tokenizer cannot be loaded"),
    "D021": (Severity.ERROR, "baseline and subject tokenizers differ"),
    "D030": (Severity.ERROR, "dataset cannot be read (missing, empty, unlabelled for a "
                             "classifier, HF dataset offline and not cached)"),
    "D031": (Severity.ERROR, "too few unique windows for a strict profile (ci, release)"),
    "D032": (Severity.WARNING, "too few unique windows: the dev profile shrinks both sets"),
    "D033": (Severity.NOTE, "window plan: unique windows, preview + final, tokens"),
    "D034": (Severity.ERROR, "dataset.seq_len exceeds the model's context length"),
    "D040": (Severity.ERROR, "requested device not available"),
    "D041": (Severity.NOTE, "device the run will use"),
    "D042": (Severity.ERROR, "not enough free memory for the model"),
    "D043": (Severity.WARNING, "free memory is tight for the model"),
    "D050": (Severity.NOTE, "network off: hub models and datasets come from the local cache"),
    "D051": (Severity.NOTE, "network allowed (INVARLOCK_ALLOW_NETWORK=1)"),
    "D060": (Severity.ERROR, "the hf extra is not installed: certify and run cannot work; "
                             "tokenizer, window and device checks skipped"),
}


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    hint: str | None = None

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown doctor code {self.code}")

    @property
    def severity(self) -> Severity:
        return CODES[self.code][0]

    def line(self) -> str:
        text = f"{self.severity}: [INVARLOCK:{self.code}] {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text

    def as_dict(self) -> dict[str, Any]:
        return {"severity": str(self.severity), "code": f"INVARLOCK:{self.code}",
                "message": self.message, "hint": self.hint}
