"""The distribution evidence (KL divergence, top-token agreement) recomputed from its
per-window sums.

Its means, intervals and limit checks follow from the stored sums and the policy's
bootstrap; percentiles need every token and are not recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock import distribution, distribution_gate
from invarlock.policy import ResolvedPolicy
from invarlock.verification.findings import Findings


def recheck_distribution(cert: Mapping[str, Any], policy: ResolvedPolicy,
                         found: Findings) -> list[dict[str, Any]] | None:
    """Means, intervals, RMS Δp and limit checks of the distribution evidence, recomputed
    from its per-window sums; percentiles need every token and are not recomputed (a limit
    on one is decided again from the stored value). Returns the limits' records (the stored
    ones where the sums cannot be recomputed, already reported), None when not measured."""
    d = cert.get("distribution")
    if not d:
        return None
    found.checked.append("distribution")
    where = "distribution"
    expected_set = "final" if cert["pairing"].get("final_evaluated") else "preview"
    if d["set"] != expected_set:
        found.differ(f"{where}.set", f"{d['set']!r}, but the primary metric rests on the "
                                     f"{expected_set} set")
    windows = cert["windows"][expected_set]
    n = len(windows.get("subject") or windows["ids"])  # a sequential run stops at a look
    per_window = d["windows"]
    if per_window["ids"] != windows["ids"][:n] or per_window["tokens"] != windows["tokens"][:n]:
        found.differ(f"{where}.windows", f"ids or token counts differ from windows."
                                         f"{expected_set}")
        return list(d["checks"])
    lengths = {len(per_window[f]) for f in ("ids", *distribution.WINDOW_FIELDS)}
    if len(lengths) != 1:
        found.differ(f"{where}.windows", "per-window arrays of different lengths")
        return list(d["checks"])
    boot = policy.bootstrap
    found.compare(f"{where}.bootstrap", d["bootstrap"],
                  {"replicates": boot.replicates, "seed": boot.seed, "alpha": boot.alpha})
    try:
        core = distribution.recomputable(distribution.WindowDistribution.from_dict(per_window),
                                         replicates=boot.replicates, seed=boot.seed,
                                         alpha=boot.alpha)
    except ValueError as exc:
        found.differ(where, f"cannot be recomputed from the stored windows: {exc}")
        return list(d["checks"])
    found.compare(where, {k: d[k] for k in core}, core)
    hist = d["histogram"]
    if sum(hist["counts"]) + hist["below"] + hist["above"] != d["tokens"]:
        found.differ(f"{where}.histogram", "counts do not add up to the tokens")
    limits = distribution_gate.Limits.from_policy(policy.values.get("distribution"))
    found.compare(f"{where}.limits", d["limits"], limits.as_dict())
    records = distribution_gate.checks({**core, "kld": d["kld"]}, limits)
    found.compare(f"{where}.checks", d["checks"], records)
    return records
