"""Whether two certificates were judged against the same baseline evidence.

Used by `verify --baseline-cert`: subjects compared side by side must rest on identical
baseline numbers, or their verdicts are not comparable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock.verification.findings import SETS

_BASELINE_FIELDS = (
    ("baseline", "weights_digest"), ("baseline", "digest_basis"), ("baseline", "dtype"),
    ("baseline", "adapter"), ("tokenizer", "hash"), ("dataset", "digest"),
    ("windows", "kind"), ("windows", "seq_len"), ("windows", "stride"), ("windows", "seed"),
    ("windows", "plan_digest"),
)


def baseline_evidence_differences(cert: Mapping[str, Any],
                                  reference: Mapping[str, Any]) -> list[str]:
    """Where `cert`'s baseline evidence differs from `reference`'s.

    Two certificates share baseline evidence when the baseline weights (digest), tokenizer,
    dataset content, window plan (digest, ids, hashes, token counts) and every baseline
    per-window result are identical: then their subjects were judged against the same
    numbers, and their verdicts can be compared side by side.
    """
    lines = []
    for section, key in _BASELINE_FIELDS:
        mine, theirs = _get(cert, section, key), _get(reference, section, key)
        if mine != theirs:
            lines.append(f"{section}.{key}: {mine!r} vs reference {theirs!r}")
    for name in SETS:
        for field in ("ids", "sha256", "tokens", "baseline"):
            mine = _get(cert, "windows", name, field) or []
            theirs = _get(reference, "windows", name, field) or []
            line = _array_difference(f"windows.{name}.{field}", mine, theirs)
            if line:
                lines.append(line)
    return lines


def _get(data: Mapping[str, Any], *keys: str) -> Any:
    node: Any = data
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _array_difference(where: str, mine: list[Any], theirs: list[Any]) -> str | None:
    if len(mine) != len(theirs):
        return f"{where}: {len(mine)} entries vs reference {len(theirs)}"
    differing = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]
    if not differing:
        return None
    i = differing[0]
    return (f"{where}: {len(differing)} of {len(mine)} differ (first at [{i}]: {mine[i]!r} vs "
            f"reference {theirs[i]!r})")
