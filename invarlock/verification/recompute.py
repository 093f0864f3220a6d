"""The primary metric, the evidence section, the validation flags and the verdict, recomputed
from the window arrays with the very functions `certify` uses (`invarlock.gate`).

The certificate's stored numbers are compared with the recomputed ones; nothing it says
about itself (weakened settings, the interval's level) is taken on trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock import __version__, distribution_gate, gate, sequential_run
from invarlock.errors import ConfigError
from invarlock.policy import ResolvedPolicy, evidence_floor, weakened_settings
from invarlock.verification.findings import Findings
from invarlock.verification.guards import guard_modes, recheck_guards, stopping_guard
from invarlock.verification.sequential import planned_design, recheck_sequence
from invarlock.verification.windows import Sets, recomputed_overlap


def recompute(cert: Mapping[str, Any], policy: ResolvedPolicy, sets: Sets,
              found: Findings, distribution_records: list[dict[str, Any]] | None) -> None:
    """Pairing, the primary metric, the evidence, every flag and the verdict, each compared
    with what the certificate stores; `distribution_records` are the distribution limits'
    records (None: not measured)."""
    found.checked.append("pairing")
    win = cert["windows"]
    overlap = recomputed_overlap(win["preview"]["sha256"], win["final"]["sha256"])
    found.compare("pairing.overlap", cert["pairing"]["overlap"], overlap)
    checks = [gate.pairing_check(cert["pairing"]["match"], overlap, len(win["preview"]["ids"]),
                                 len(win["final"]["ids"]))]

    found.checked.append("primary metric")
    if sets.preview is None:
        found.differ("windows.preview.subject", "empty: the preview set is always evaluated")
        return
    sequence = recheck_sequence(cert, policy, sets, found)
    try:
        pm = gate.primary_metric(sets.kind, sets.preview, sets.final, policy.primary_metric,
                                 sequential_run.fixed_bootstrap(
                                     policy.bootstrap, sequence.design if sequence else None))
    except ValueError as exc:
        found.differ("primary_metric", f"cannot be recomputed from the stored arrays: {exc}")
        return
    guard_checks = recheck_guards(cert, found)
    stopped_by = stopping_guard(cert, guard_checks) if sets.final is None else None
    if sets.final is not None and pm.final is None:
        found.differ("windows.final.subject", "filled although the preview was catastrophic "
                                              "(the final set is not evaluated then)")
    if sets.final is None and not pm.catastrophic and not stopped_by:
        found.differ("windows.final.subject", "empty although neither the preview was "
                                              "catastrophic nor a guard failed before "
                                              "evaluation (the final set must be evaluated)")
    if cert["pairing"].get("final_evaluated") is not (sets.final is not None):
        found.differ("pairing.final_evaluated", "disagrees with windows.final.subject")
    found.compare("primary_metric", cert["primary_metric"], pm.as_dict())
    checks += sequential_run.primary_checks(pm, policy.primary_metric, sequence)
    limits = distribution_gate.Limits.from_policy(policy.values.get("distribution"))
    measured = distribution_records is not None
    evidence = _recheck_evidence(cert, policy, found, distribution_gate.shortfall(
        limits, measured, sets.kind.is_perplexity))
    if evidence is None:
        return
    checks.append(evidence.check())
    if distribution_records is not None:
        checks.append(distribution_gate.check(distribution_records))
    checks += guard_checks

    found.checked.append("verdict")
    expected_gating = [*gate.primary_gating(evidence.floor),
                       *distribution_gate.gating(limits, measured),
                       *(c.flag for c, mode in zip(guard_checks, guard_modes(cert), strict=True)
                         if mode == "gate")]
    if sorted(cert["gating"]) != sorted(expected_gating):
        found.differ("gating", f"{cert['gating']} but the primary flags, the distribution "
                               f"limits and the gate-mode guards give {expected_gating}")
    try:
        decision = gate.decide(checks, cert["gating"])
    except ValueError as exc:
        found.differ("gating", str(exc))
        decision = gate.decide(checks, expected_gating)
    found.compare("validation", cert["validation"], decision.validation)
    found.compare("verdict", cert["verdict"], decision.verdict_section())


def _recheck_evidence(cert: Mapping[str, Any], policy: ResolvedPolicy, found: Findings,
                      unmeasured: tuple[str, ...] = ()) -> gate.Evidence | None:
    """The evidence section from the window arrays, the policy and this installation's floor;
    `unmeasured`: the shortfall of a limited distribution the run did not measure."""
    found.checked.append("evidence")
    stored, win = cert["evidence"], cert["windows"]
    try:
        floor = evidence_floor(policy.profile, stored["context_length"])
    except ConfigError as exc:
        found.differ("evidence", f"cannot recompute the floor ({exc})")
        return None
    evidence = gate.Evidence(floor, len(win["preview"]["ids"]), len(win["final"]["ids"]),
                             int(win["seq_len"]), policy.bootstrap.replicates,
                             (int(win["requested"]["preview_n"]),
                              int(win["requested"]["final_n"])),
                             bool(stored["allow_underpowered"]), stored["context_length"],
                             _recheck_self_reports(cert, policy, found) + unmeasured)
    found.compare("evidence", stored, evidence.as_dict())
    short = floor.shortfalls(preview_n=evidence.requested[0], final_n=evidence.requested[1],
                             seq_len=evidence.seq_len, replicates=evidence.replicates)
    if floor.below_floor == "refuse" and short and not evidence.allow_underpowered:
        found.differ("evidence", f"below the {floor.profile} floor ({', '.join(short)}) "
                                 "without allow_underpowered: certify refuses such a run")
    return evidence


def _is_weakening(phrase: str) -> bool:
    """Whether a shortfall phrase names a weakened setting (`policy.weakened_settings`
    phrases start with the policy key; the floor's start with a count's name)."""
    head = phrase.split(" ")[0]
    return head == "bootstrap.alpha" or head.startswith(("primary_metric.", "guards.",
                                                         "distribution."))


def _recheck_self_reports(cert: Mapping[str, Any], policy: ResolvedPolicy,
                          found: Findings) -> tuple[str, ...]:
    """What the evidence section says about itself, checked against the recorded policy.

    The weakened settings (a larger α, fewer calibration windows, a higher limit, a guard
    off or in monitor) are recomputed from the recorded policy values against this
    installation's tier and profile, never read from the certificate; for a certificate
    written by another version (whose defaults may differ) a disagreement is a note and the
    certificate's own list stands, as for the policy defaults. The self-reported
    context length may only lower the window-length floor to a length the model could take:
    it cannot be shorter than the windows it was fed. Returns the weakened settings.
    """
    found.checked.append("evidence self-reports")
    try:
        weakened = weakened_settings(dict(policy.values), policy.tier, policy.profile)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        found.differ("evidence", f"cannot recompute the weakened settings ({exc})")
        return ()
    stored = cert["evidence"]
    version = cert["tool"]["version"]
    if version != __version__:
        listed = tuple(s for s in stored["shortfalls"] if _is_weakening(s))
        if listed != weakened:
            found.notes.append(f"weakened settings under this installation's defaults "
                               f"{list(weakened)}; the certificate (invarlock {version}) "
                               f"lists {list(listed)}")
        weakened = listed
    context, seq_len = stored["context_length"], int(cert["windows"]["seq_len"])
    if context is not None and int(context) < seq_len:
        found.differ("evidence.context_length", f"{context} is shorter than the {seq_len}-token "
                                                "windows the model was fed")
    level = cert["primary_metric"].get("bootstrap") or {}
    expected_alpha = _interval_alpha(cert, policy)
    if level and level.get("alpha") != expected_alpha:
        found.differ("primary_metric.bootstrap.alpha", f"{level.get('alpha')!r} but the policy "
                                                       f"gives {expected_alpha!r}")
    if stored["allow_underpowered"] and policy.profile != "dev":
        found.notes.append(f"run with allow_underpowered in the {policy.profile} profile: "
                           "evidence below the profile was accepted on request")
    return weakened


def _interval_alpha(cert: Mapping[str, Any], policy: ResolvedPolicy) -> float:
    """The level the primary metric's interval must use: the policy's α, or under a
    sequential design the share of it left for the fixed test at the maximum."""
    if cert.get("sequential") is None:
        return policy.bootstrap.alpha
    try:
        design = planned_design(cert, policy)
    except ConfigError:
        return policy.bootstrap.alpha  # reported by the sequence's own recheck
    return policy.bootstrap.alpha if design is None else design.alpha_fixed
