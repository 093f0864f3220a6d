"""The distribution evidence's part in the verdict: tier limits, one record per limit, and
the `distribution_acceptable` flag. Pure: numbers in, records out (no torch, no I/O).

Limits (`distribution` in `policies/tiers.yaml`, calibrated in `policies/CALIBRATION.md`):

- `kld_mean_upper` on the upper bound of mean KLD's paired interval: the subject's
  distribution moved no further from the baseline's than the benign edits' did;
- `same_top_p_lower` on the lower bound of the interval of "same top p" (top-token
  agreement);
- `kld_p99_upper` on the 99% KLD point (a tail the mean can hide; no interval, and `verify`
  takes the stored percentile, since recomputing it needs every token).

A limit that is null keeps its quantity monitor-only: recorded and shown, never failing.
The flag gates exactly when at least one limit is set and the run measured the evidence;
the certificate records every limit, bound and status, and `verify` recomputes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from invarlock.gate import Check

FLAG = "distribution_acceptable"
KEYS = ("kld_mean_upper", "same_top_p_lower", "kld_p99_upper")


@dataclass(frozen=True)
class Limits:
    """Tier limits; None keeps a quantity monitor-only (recorded and shown, never failing)."""

    kld_mean_upper: float | None = None    # on the upper bound of mean KLD's interval
    same_top_p_lower: float | None = None  # on the lower bound of agreement's interval
    kld_p99_upper: float | None = None     # on the 99% KLD point

    @classmethod
    def from_policy(cls, section: Mapping[str, Any] | None) -> Limits:
        section = section or {}
        return cls(*(None if section.get(k) is None else float(section[k]) for k in KEYS))

    def as_dict(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in KEYS}

    @property
    def gates(self) -> bool:
        """Whether any quantity is calibrated here (the flag decides the verdict)."""
        return any(v is not None for v in self.as_dict().values())


# name, limit key, where the bound is read, the word for it, whether the limit is a ceiling
_RULES = (
    ("kld_mean", "kld_mean_upper", ("kld_mean", "high"), "mean KLD upper bound", True),
    ("same_top_p", "same_top_p_lower", ("same_top_p", "low"), "same top p lower bound", False),
    ("kld_p99", "kld_p99_upper", ("kld", "p99"), "99% KLD", True),
)


def checks(stored: Mapping[str, Any], limits: Limits) -> list[dict[str, Any]]:
    """One record per quantity: `monitor` without a limit, else `pass` or `fail`.

    `stored` holds `kld_mean` and `same_top_p` intervals (`high`, `low`) and the `kld`
    percentiles (`p99`), as the certificate's `distribution` section does."""
    out = []
    for name, key, (part, end), _, ceiling in _RULES:
        bound = float(stored[part][end])
        limit = getattr(limits, key)
        if limit is None:
            status = "monitor"
        else:
            status = "pass" if (bound <= limit if ceiling else bound >= limit) else "fail"
        out.append({"name": name, "bound": bound, "limit": limit, "status": status})
    return out


def check(records: list[dict[str, Any]]) -> Check:
    """The flag and its sentence, e.g. "mean KLD upper bound 0.0410 > limit 0.0300"."""
    words = {name: (label, ceiling) for name, _, _, label, ceiling in _RULES}
    parts, ok = [], True
    for r in records:
        label, ceiling = words[r["name"]]
        if r["status"] == "monitor":
            continue
        failed = r["status"] == "fail"
        ok = ok and not failed
        op = (">" if failed else "<=") if ceiling else ("<" if failed else ">=")
        parts.append(f"{label} {_shown(r['name'], r['bound'])} {op} limit "
                     f"{_shown(r['name'], r['limit'])}")
    monitored = [words[r["name"]][0] for r in records if r["status"] == "monitor"]
    if monitored:
        parts.append(f"monitor-only (no calibrated limit): {', '.join(monitored)}")
    return Check(FLAG, ok, "; ".join(parts))


def gating(limits: Limits, measured: bool) -> tuple[str, ...]:
    """The flag gates where the tier sets a limit and the run measured the evidence."""
    return (FLAG,) if limits.gates and measured else ()


def shortfall(limits: Limits, measured: bool, language_model: bool) -> tuple[str, ...]:
    """An evidence shortfall where the tier limits the distribution but a language model's
    run recorded none (a baseline llama.cpp scores returns per-token losses only): the limit
    was not applied, so the run does not carry the evidence its tier promises."""
    if limits.gates and language_model and not measured:
        return ("distribution limits set, but the run recorded no distribution evidence",)
    return ()


def _shown(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if name == "same_top_p" else f"{value:.4g}"
