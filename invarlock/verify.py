"""Re-check a certificate without models: schema, digests, pairing, numbers, flags, verdict.

A certificate stores every per-window number its verdict depends on, the policy it was
judged by and the bootstrap seed. `verify_certificate` recomputes the primary metric, its
BCa interval, every validation flag and the verdict with the very functions `certify` uses
(`invarlock.gate`), and reports each field where the stored value and the recomputed one
disagree. Guard sections are re-checked by `invarlock.guards.recheck`.

What this proves: the document is intact (content digest), well-formed (schema), and its
verdict follows from its own numbers under its own recorded policy, which in turn agrees with
this installation's tier and profile except where overrides are declared. What it cannot
prove: that the numbers came from running these models on this data; re-running `certify`
(or comparing with a trusted certificate through `--baseline-cert`) does that.

Numbers are compared with a relative tolerance of 1e-12 (absolute 1e-15 near zero); on the
same platform the recomputation is bit-identical, the tolerance absorbs floating-point
differences between numpy builds. Flags, counts, strings and the verdict must match exactly.

Pure: certificate dicts in, a report out (no I/O).

The checks live in `invarlock.verification`, one module per section; this module runs them
in order and keeps the public names (`verify_certificate`, `VerifyReport`, the tolerances).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock.certificate.document import schema_errors
from invarlock.verification.baseline import baseline_evidence_differences
from invarlock.verification.distribution import recheck_distribution
from invarlock.verification.document import (
    check_digest,
    check_formats,
    check_layout,
    check_policy,
    stored_verdict,
)
from invarlock.verification.findings import ABS_TOL, REL_TOL, SETS, Findings, VerifyReport
from invarlock.verification.recompute import recompute
from invarlock.verification.reference import reference_differences
from invarlock.verification.sequential import (
    check_baseline_blocks,
    check_evaluated_counts,
    recheck_sequence,
)
from invarlock.verification.windows import check_arrays, recomputed_overlap

__all__ = ["ABS_TOL", "REL_TOL", "SETS", "VerifyReport", "baseline_evidence_differences",
           "recheck_sequence", "recomputed_overlap", "verify_certificate"]


def verify_certificate(cert: Mapping[str, Any],
                       reference: Mapping[str, Any] | None = None) -> VerifyReport:
    """Re-check `cert`; with `reference`, also confirm both share the same baseline evidence."""
    found = Findings()
    verdict = stored_verdict(cert)
    check_digest(cert, found)
    problems = schema_errors(dict(cert))
    found.checked.append("schema")
    if problems:
        for line in problems:
            found.differ("schema", line)
        return found.report(verdict)  # numbers cannot be trusted to be where they belong
    policy = check_policy(cert, found)
    if policy is not None:
        check_layout(cert, policy, found)
        check_evaluated_counts(cert, policy, found)
        check_baseline_blocks(cert, policy, found)
        arrays = check_arrays(cert, found)
        records = recheck_distribution(cert, policy, found)
        if arrays is not None:
            recompute(cert, policy, arrays, found, records)
    check_formats(cert, found)
    if "reference" in cert:
        found.checked.append("reference digests")
        for where, message in reference_differences(cert):
            found.differ(where, message)
    if reference is not None:
        found.checked.append("baseline evidence")
        for line in baseline_evidence_differences(cert, reference):
            found.differ("baseline evidence", line)
    return found.report(verdict)
