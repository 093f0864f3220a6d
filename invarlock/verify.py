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
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from invarlock import __version__, distribution, gate, sequential_run
from invarlock.certificate.document import content_digest, schema_errors
from invarlock.config import flatten
from invarlock.enums import AdapterKind, MetricKind
from invarlock.errors import ConfigError, InvarlockError
from invarlock.policy import (
    ResolvedPolicy,
    evidence_floor,
    policy_digest,
    resolve,
    weakened_settings,
)

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


class _Findings:
    """Collects differences and notes while the checks run."""

    def __init__(self) -> None:
        self.differences: list[str] = []
        self.notes: list[str] = []
        self.checked: list[str] = []

    def differ(self, where: str, message: str) -> None:
        self.differences.append(f"{where}: {message}")

    def compare(self, where: str, stored: Any, recomputed: Any) -> None:
        """Record every leaf where `stored` and `recomputed` disagree."""
        for path, message in _diff(where, stored, recomputed):
            self.differ(path, message)


def verify_certificate(cert: Mapping[str, Any],
                       reference: Mapping[str, Any] | None = None) -> VerifyReport:
    """Re-check `cert`; with `reference`, also confirm both share the same baseline evidence."""
    found = _Findings()
    verdict = _stored_verdict(cert)
    _check_digest(cert, found)
    problems = schema_errors(dict(cert))
    found.checked.append("schema")
    if problems:
        for line in problems:
            found.differ("schema", line)
        return _report(verdict, found)  # numbers cannot be trusted to be where they belong
    policy = _check_policy(cert, found)
    if policy is not None:
        _check_layout(cert, policy, found)
        check_evaluated_counts(cert, policy, found)
        arrays = _check_arrays(cert, found)
        if arrays is not None:
            _recompute(cert, policy, arrays, found)
        _recheck_distribution(cert, policy, found)
    _check_formats(cert, found)
    if reference is not None:
        found.checked.append("baseline evidence")
        for line in baseline_evidence_differences(cert, reference):
            found.differ("baseline evidence", line)
    return _report(verdict, found)


def _check_formats(cert: Mapping[str, Any], found: _Findings) -> None:
    """A quantized / GGUF model's format record agrees with itself; it is shown as a note."""
    from invarlock.certificate.markdown import format_line

    for role in ("baseline", "subject"):
        fmt = cert[role].get("format")
        if not fmt:
            continue
        found.checked.append(f"{role} format")
        runtime = fmt.get("runtime")
        served = isinstance(runtime, Mapping) and runtime.get("name") == "llama.cpp"
        if fmt["name"] == "gguf" and fmt["forward"] != (
                "quantized-kernels" if served else "dequantized"):
            found.differ(f"{role}.format.forward", "a GGUF model is evaluated by llama.cpp's "
                         "kernels or dequantized, as its `runtime` record says")
        if fmt.get("dequantize_requested") and fmt["forward"] != "dequantized":
            found.differ(f"{role}.format.forward", "--dequantize was given but the forward "
                         "is recorded as quantized kernels")
        found.notes.append(f"{role} format: {format_line(dict(fmt))}")


def _report(verdict: str | None, found: _Findings) -> VerifyReport:
    return VerifyReport(verdict, tuple(found.differences), tuple(found.notes),
                        tuple(found.checked))


def _stored_verdict(cert: Mapping[str, Any]) -> str | None:
    verdict = cert.get("verdict")
    status = verdict.get("status") if isinstance(verdict, Mapping) else None
    return status if status in ("PASS", "FAIL") else None


def _check_digest(cert: Mapping[str, Any], found: _Findings) -> None:
    found.checked.append("digest")
    try:
        actual = content_digest(dict(cert))
    except ValueError as exc:  # NaN or Infinity: not canonical JSON
        found.differ("digest", f"content is not canonical JSON ({exc})")
        return
    stored = cert.get("digest")
    if stored != actual:
        found.differ("digest", f"certificate says {stored}, its content hashes to {actual} "
                               "(edited after it was sealed)")


# --- policy ---------------------------------------------------------------------------------

def _check_policy(cert: Mapping[str, Any], found: _Findings) -> ResolvedPolicy | None:
    """The recorded policy: its digest, its shape, and its agreement with tier defaults."""
    found.checked.append("policy")
    recorded = cert["policy"]
    actual = policy_digest(recorded["values"])
    if recorded["digest"] != actual:
        found.differ("policy.digest", f"certificate says {recorded['digest']}, the recorded "
                                      f"values hash to {actual}")
    policy = ResolvedPolicy(recorded["tier"], recorded["profile"], recorded["values"],
                            tuple(recorded["overrides"]))
    try:
        _parsed = (policy.primary_metric, policy.windows, policy.bootstrap)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        found.differ("policy.values", f"incomplete or malformed ({type(exc).__name__}: {exc})")
        return None
    _check_policy_defaults(cert, policy, found)
    return policy


def _check_policy_defaults(cert: Mapping[str, Any], policy: ResolvedPolicy,
                           found: _Findings) -> None:
    """Every value that differs from the tier/profile defaults must be a declared override.

    The defaults are this installation's; for a certificate written by another version a
    disagreement is only a note (tiers are recalibrated between releases).
    """
    same_version = cert["tool"]["version"] == __version__
    try:
        defaults = resolve({"auto": {"tier": policy.tier, "profile": policy.profile}}).values
    except ConfigError as exc:
        message = f"tier/profile {policy.tier}/{policy.profile} unknown here ({exc})"
        if same_version:
            found.differ("policy", message)
        else:
            found.notes.append(message)
        return
    recorded, expected = flatten(policy.values), flatten(defaults)
    expected["windows.stride"] = recorded.get("windows.seq_len")  # stride follows seq_len
    declared = set(policy.overrides)
    lines = []
    for key in sorted(set(recorded) | set(expected)):
        if key not in recorded:
            lines.append(f"policy.values.{key} is missing (default {expected[key]!r})")
        elif key not in expected:
            if key not in declared:
                lines.append(f"policy.values.{key} = {recorded[key]!r} is not a known policy "
                             "value and not declared as an override")
        elif recorded[key] != expected[key] and key not in declared:
            lines.append(f"policy.values.{key} = {recorded[key]!r} differs from the "
                         f"{policy.tier}/{policy.profile} default {expected[key]!r} but is not "
                         "declared in policy.overrides")
    for line in lines:
        if same_version:
            found.differ("policy", line)
        else:
            found.notes.append(f"{line} (certificate from invarlock "
                               f"{cert['tool']['version']}, defaults of {__version__})")


# --- layout: fields that must agree with each other and with the policy ---------------------

def _check_layout(cert: Mapping[str, Any], policy: ResolvedPolicy, found: _Findings) -> None:
    found.checked.append("consistency")
    win, pm, pairing = cert["windows"], cert["primary_metric"], cert["pairing"]
    wp, bp = policy.windows, policy.bootstrap
    pairs = [
        ("primary_metric.kind", pm["kind"], win["kind"], "windows.kind"),
        ("windows.seq_len", win["seq_len"], wp.seq_len, "policy windows.seq_len"),
        ("windows.stride", win["stride"], wp.stride, "policy windows.stride"),
        ("windows.seed", win["seed"], wp.seed, "policy windows.seed"),
        ("seeds.windows", cert["seeds"]["windows"], wp.seed, "policy windows.seed"),
        ("seeds.bootstrap", cert["seeds"]["bootstrap"], bp.seed, "policy bootstrap.seed"),
        ("windows.requested.preview_n", win["requested"]["preview_n"], wp.preview_n,
         "policy windows.preview_n"),
        ("windows.requested.final_n", win["requested"]["final_n"], wp.final_n,
         "policy windows.final_n"),
        ("subject.adapter", cert["subject"]["adapter"], cert["baseline"]["adapter"],
         "baseline.adapter"),
        ("primary_metric.kind", pm["kind"], str(AdapterKind(cert["baseline"]["adapter"]).metric),
         "the metric of adapter " + cert["baseline"]["adapter"]),
    ]
    for where, value, should, source in pairs:
        if value != should:
            found.differ(where, f"{value!r} but {source} is {should!r}")
    for name in SETS:
        n = len(win[name]["ids"])
        if pairing[f"{name}_n"] != n:
            found.differ(f"pairing.{name}_n", f"{pairing[f'{name}_n']} but windows.{name} "
                                              f"holds {n} windows")
        if n > win["requested"][f"{name}_n"]:
            found.differ(f"windows.{name}", f"{n} windows, more than the "
                                            f"{win['requested'][f'{name}_n']} requested")
        if wp.strict and n != win["requested"][f"{name}_n"]:
            found.differ(f"windows.{name}", f"{n} windows but the {policy.profile} profile is "
                                            f"strict and requested {win['requested'][f'{name}_n']}")
    used = len(win["preview"]["ids"]) + len(win["final"]["ids"])
    if used > win["available"]:
        found.differ("windows.available", f"{win['available']} unique windows cannot supply "
                                          f"{used}")
    if pairing["match"] != 1.0:
        found.differ("pairing.match", f"{pairing['match']} (certify stops unless both models "
                                      "scored identical windows)")
    evaluated = len(win["final"]["subject"]) > 0
    if pairing["final_evaluated"] != evaluated:
        state = "filled" if evaluated else "empty"
        found.differ("pairing.final_evaluated", f"{pairing['final_evaluated']} but the final "
                                                f"subject array is {state}")
    is_edit = cert["edit"] is not None
    if (cert["subject"]["kind"] == "edit") != is_edit:
        found.differ("subject.kind", f"{cert['subject']['kind']!r} does not fit "
                                     f"edit = {'a section' if is_edit else 'null'}")


# --- per-window arrays ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Sets:
    kind: MetricKind
    preview: gate.PairedArrays | None  # None only in a malformed certificate
    final: gate.PairedArrays | None  # None when the final set was not evaluated


def _check_arrays(cert: Mapping[str, Any], found: _Findings) -> _Sets | None:
    """Shapes and domains of the stored arrays; the paired arrays when they are sound."""
    found.checked.append("windows")
    win = cert["windows"]
    kind = MetricKind(win["kind"])
    ok = True
    ids_seen: dict[int, str] = {}
    for name in SETS:
        ws = win[name]
        n = len(ws["ids"])
        m = len(ws["baseline"])  # the windows evaluated: a prefix of the plan
        if len(ws["sha256"]) != n:
            found.differ(f"windows.{name}.sha256", f"{len(ws['sha256'])} entries for {n} "
                                                   "window ids")
            ok = False
        if m > n:
            found.differ(f"windows.{name}.baseline", f"{m} entries for {n} window ids")
            ok = False
        if len(ws["tokens"]) != m:
            found.differ(f"windows.{name}.tokens", f"{len(ws['tokens'])} entries for {m} "
                                                   "baseline values")
            ok = False
        subj_n = len(ws["subject"])
        if subj_n != m and not (name == "final" and subj_n == 0 and m == 0):
            found.differ(f"windows.{name}.subject", f"{subj_n} entries for {m} baseline "
                                                    "values")
            ok = False
        if len(set(ws["sha256"])) != len(ws["sha256"]):
            found.differ(f"windows.{name}.sha256", "repeats a window hash (windows are "
                                                   "deduplicated)")
        for i in ws["ids"]:
            if i in ids_seen:
                found.differ(f"windows.{name}.ids", f"window id {i} also appears in "
                                                    f"{ids_seen[i]}")
                break
            ids_seen[i] = name
        ok &= _check_domain(kind, name, ws, win["seq_len"], found)
    if not ok:
        return None
    paired = {name: _paired(win[name]) for name in SETS}
    return _Sets(kind, paired["preview"], paired["final"])


def _check_domain(kind: MetricKind, name: str, ws: Mapping[str, Any], seq_len: int,
                  found: _Findings) -> bool:
    tokens = np.asarray(ws["tokens"], dtype=np.int64)
    base = np.asarray(ws["baseline"], dtype=np.float64)
    if kind is MetricKind.PPL_CAUSAL:
        bad = np.flatnonzero(tokens != seq_len - 1)
        rule = f"a causal window of {seq_len} tokens scores {seq_len - 1}"
    elif kind is MetricKind.PPL_MLM:
        bad = np.flatnonzero(tokens > seq_len - 2)
        rule = f"a masked-LM window scores at most {seq_len - 2} masked positions"
    else:
        bad = np.flatnonzero(tokens != 1)
        rule = "a classifier example scores 1"
    if bad.size:
        found.differ(f"windows.{name}.tokens[{bad[0]}]", f"{tokens[bad[0]]}, but {rule}")
    if kind is MetricKind.ACCURACY:
        subj = [v for v in ws["subject"] if v is not None]
        if not np.all(np.isin(base, (0.0, 1.0))) or not np.all(np.isin(subj, (0.0, 1.0))):
            found.differ(f"windows.{name}", "classifier correctness values must be 0 or 1")
            return False
    elif base.size and np.min(base) < 0:
        found.differ(f"windows.{name}.baseline", "a negative log-loss sum")
        return False
    return not bad.size


def _paired(ws: Mapping[str, Any]) -> gate.PairedArrays | None:
    """Both sides on the windows the subject was evaluated on (a prefix after an early stop)."""
    if not ws["subject"]:
        return None
    subject = np.array([np.nan if v is None else v for v in ws["subject"]], dtype=np.float64)
    n = subject.size
    return gate.PairedArrays(tokens=np.asarray(ws["tokens"][:n], dtype=np.int64),
                             baseline=np.asarray(ws["baseline"][:n], dtype=np.float64),
                             subject=subject)


# --- recomputation --------------------------------------------------------------------------

def _recompute(cert: Mapping[str, Any], policy: ResolvedPolicy, sets: _Sets,
               found: _Findings) -> None:
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
    guard_checks = _recheck_guards(cert, found)
    stopped_by = _stopped_by(cert, guard_checks) if sets.final is None else None
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
    evidence = _recheck_evidence(cert, policy, found)
    if evidence is None:
        return
    checks.append(evidence.check())
    checks += guard_checks

    found.checked.append("verdict")
    expected_gating = [*gate.primary_gating(evidence.floor),
                       *(c.flag for c, mode in zip(guard_checks, _guard_modes(cert), strict=True)
                         if mode == "gate")]
    if sorted(cert["gating"]) != sorted(expected_gating):
        found.differ("gating", f"{cert['gating']} but the primary flags and the gate-mode "
                               f"guards give {expected_gating}")
    try:
        decision = gate.decide(checks, cert["gating"])
    except ValueError as exc:
        found.differ("gating", str(exc))
        decision = gate.decide(checks, expected_gating)
    found.compare("validation", cert["validation"], decision.validation)
    found.compare("verdict", cert["verdict"], decision.verdict_section())


def _recheck_distribution(cert: Mapping[str, Any], policy: ResolvedPolicy,
                          found: _Findings) -> None:
    """Means, intervals, RMS Δp and limit checks of the distribution evidence, recomputed
    from its per-window sums; percentiles need every token and are not recomputed."""
    d = cert.get("distribution")
    if not d:
        return
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
        return
    lengths = {len(per_window[f]) for f in ("ids", *distribution.WINDOW_FIELDS)}
    if len(lengths) != 1:
        found.differ(f"{where}.windows", "per-window arrays of different lengths")
        return
    boot = policy.bootstrap
    found.compare(f"{where}.bootstrap", d["bootstrap"],
                  {"replicates": boot.replicates, "seed": boot.seed, "alpha": boot.alpha})
    try:
        core = distribution.recomputable(distribution.WindowDistribution.from_dict(per_window),
                                         replicates=boot.replicates, seed=boot.seed,
                                         alpha=boot.alpha)
    except ValueError as exc:
        found.differ(where, f"cannot be recomputed from the stored windows: {exc}")
        return
    found.compare(where, {k: d[k] for k in core}, core)
    hist = d["histogram"]
    if sum(hist["counts"]) + hist["below"] + hist["above"] != d["tokens"]:
        found.differ(f"{where}.histogram", "counts do not add up to the tokens")
    limits = distribution.Limits.from_policy(policy.values.get("distribution"))
    found.compare(f"{where}.limits", d["limits"],
                  {"kld_mean_max": limits.kld_mean_max, "same_top_p_min": limits.same_top_p_min})
    found.compare(f"{where}.checks", d["checks"], distribution.checks(core, limits))


def recheck_sequence(cert: Mapping[str, Any], policy: ResolvedPolicy, sets: _Sets,
                     found: _Findings) -> sequential_run.SequentialOutcome | None:
    """The `sequential` section recomputed from the policy's design and the window arrays:
    the σ̂ floor from the preview set, the differences in stored (evaluation) order, every
    look and the decision; and the run must have stopped exactly at the first deciding look,
    or at the maximum. An altered, dropped or reordered look or difference shows here."""
    stored = cert.get("sequential")
    try:
        design = _design(cert, policy)
    except ConfigError as exc:
        found.differ("sequential", f"the policy's sequential design is invalid ({exc})")
        return None
    if design is None or sets.final is None or sets.preview is None:
        if stored is not None:
            found.differ("sequential", "present although the policy's design is off or the "
                                       "final set was not evaluated")
        return None
    found.checked.append("sequential")
    if stored is None:
        found.differ("sequential", "missing although the policy's sequential design is on")
        return None
    kind, prev, fin = sets.kind, sets.preview, sets.final
    outcome = sequential_run.sequence(
        design, sequential_run.threshold_for(kind, policy),
        sequential_run.preview_floor(kind, prev.tokens, prev.baseline, prev.subject),
        sequential_run.differences(kind, fin.tokens, fin.baseline, fin.subject))
    found.compare("sequential", stored, sequential_run.section(outcome))
    n, result = outcome.stopped_at, outcome.result
    if n not in design.looks:
        found.differ("sequential.stopped_at", f"{n} windows evaluated, which is no look of "
                                              f"the design {list(design.looks)}")
    elif result is not None and result.stopped_at != n:
        found.differ("sequential.stopped_at", f"{n} windows evaluated but the look at "
                                              f"{result.stopped_at} already decided "
                                              f"{result.decision.value}")
    elif result is not None and not outcome.early and n != design.n_max:
        found.differ("sequential.stopped_at", f"stopped undecided after {n} windows, before "
                                              f"the maximum {design.n_max}")
    return outcome


def _recheck_evidence(cert: Mapping[str, Any], policy: ResolvedPolicy,
                      found: _Findings) -> gate.Evidence | None:
    """The evidence section from the window arrays, the policy and this installation's floor."""
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
                             _recheck_self_reports(cert, policy, found))
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
    return head == "bootstrap.alpha" or head.startswith(("primary_metric.", "guards."))


def _recheck_self_reports(cert: Mapping[str, Any], policy: ResolvedPolicy,
                          found: _Findings) -> tuple[str, ...]:
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


def _design(cert: Mapping[str, Any], policy: ResolvedPolicy) -> Any:
    """The policy's sequential design for the planned sets of this certificate (None: off)."""
    win = cert["windows"]
    return sequential_run.design_for(policy, len(win["final"]["ids"]), len(win["preview"]["ids"]))


def check_evaluated_counts(cert: Mapping[str, Any], policy: ResolvedPolicy,
                           found: _Findings) -> None:
    """The preview windows evaluated are exactly the design's cut (the whole set without a
    design): a run that scored fewer, or more and kept the ones it liked, shows here."""
    win = cert["windows"]
    try:
        design = _design(cert, policy)
    except ConfigError:
        return  # reported by the sequence's own recheck
    planned = len(win["preview"]["ids"])
    expected = sequential_run.preview_needed(design, planned)
    n = len(win["preview"]["subject"])
    if n != expected:
        why = (f"the design scores the first {expected}" if design is not None
               else f"the fixed design scores all {planned}")
        found.differ("windows.preview.subject", f"{n} windows evaluated, but {why}")


def _interval_alpha(cert: Mapping[str, Any], policy: ResolvedPolicy) -> float:
    """The level the primary metric's interval must use: the policy's α, or under a
    sequential design the share of it left for the fixed test at the maximum."""
    if cert.get("sequential") is None:
        return policy.bootstrap.alpha
    try:
        design = _design(cert, policy)
    except ConfigError:
        return policy.bootstrap.alpha  # reported by the sequence's own recheck
    return policy.bootstrap.alpha if design is None else design.alpha_fixed


def _stopped_by(cert: Mapping[str, Any], guard_checks: list[gate.Check]) -> str | None:
    """The guard whose failure stopped the run before evaluation, as the sections show it:
    that guard measured and failed (its recomputed check), every other guard was not
    measured. Then no final set was evaluated, and none may be stored."""
    sections = list(cert["guards"].items())
    measured = [(name, check) for (name, section), check in zip(sections, guard_checks,
                                                                strict=True)
                if _measured(section)]
    if len(measured) != 1 or measured[0][1].passed:
        return None
    name = measured[0][0]
    others_unmeasured = all(not _measured(section) for other, section in sections
                            if other != name)
    return name if others_unmeasured else None


def _measured(section: Mapping[str, Any]) -> bool:
    measurements = section.get("measurements")
    return not isinstance(measurements, Mapping) or measurements.get("evaluated", True) is not False


def recomputed_overlap(preview_hashes: list[str], final_hashes: list[str]) -> float:
    """Fraction of final windows whose content hash also occurs in the preview set."""
    if not final_hashes:
        return 0.0
    seen = set(preview_hashes)
    return sum(h in seen for h in final_hashes) / len(final_hashes)


def _guard_modes(cert: Mapping[str, Any]) -> list[str]:
    return [str(section.get("mode")) for section in cert["guards"].values()]


def _recheck_guards(cert: Mapping[str, Any], found: _Findings) -> list[gate.Check]:
    """One check per guard section: recomputed by the guard's own pure `recheck`."""
    checks = []
    values = cert["policy"]["values"]
    for name, section in cert["guards"].items():
        found.checked.append(f"guard {name}")
        where = f"guards.{name}"
        flag = section.get("flag")
        stored = gate.Check(str(flag), bool(section.get("passed")), str(section.get("reason")))
        if not isinstance(flag, str) or not isinstance(section.get("passed"), bool):
            found.differ(where, "a guard section needs a string `flag` and a boolean `passed`")
            checks.append(stored)
            continue
        policy_mode = (values.get("guards") or {}).get(name, {}).get("mode")
        if policy_mode is not None and policy_mode != section.get("mode"):
            found.differ(f"{where}.mode", f"{section.get('mode')!r} but the policy says "
                                          f"{policy_mode!r}")
        recomputed, why = _guard_recheck(name, section, values)
        if recomputed is None:
            found.differ(where, why if why.startswith("cannot re-check") else
                         f"cannot re-check guard {name} ({why})")
            checks.append(stored)
            continue
        found.compare(where, {"flag": flag, "passed": section["passed"],
                              "reason": section.get("reason")},
                      {"flag": recomputed.flag, "passed": recomputed.passed,
                       "reason": recomputed.reason})
        for part, value in _guard_details(name, section, values).items():
            if part in section:
                found.compare(f"{where}.{part}", section[part], value)
        checks.append(recomputed)
    return checks


def _guard_recheck(name: str, section: Mapping[str, Any],
                   values: Mapping[str, Any]) -> tuple[gate.Check | None, str]:
    """`invarlock.guards.recheck`, or why it cannot run here."""
    try:
        guards = importlib.import_module("invarlock.guards")
    except ImportError:
        return None, "invarlock.guards is not installed"
    from invarlock import plugins

    plugins.register_guard_plugins()
    recheck = getattr(guards, "recheck", None)
    if recheck is None:
        return None, "this installation's invarlock.guards has no recheck"
    guard_policy = dict((values.get("guards") or {}).get(name) or {})
    try:
        return recheck(name, dict(section), guard_policy), ""
    except InvarlockError as exc:  # e.g. the guard is not installed here
        return None, str(exc)
    except Exception as exc:  # malformed measurements, or a plugin's own failure
        return None, f"{type(exc).__name__}: {exc}"


def _guard_details(name: str, section: Mapping[str, Any],
                   values: Mapping[str, Any]) -> dict[str, Any]:
    """Findings and summary as the guard's pure `decide` recomputes them (when it can)."""
    try:
        guards = importlib.import_module("invarlock.guards")
        decision = guards.get_guard(name).decide(
            section["measurements"], dict((values.get("guards") or {}).get(name) or {}))
    except Exception:  # already reported through recheck, or no decide to call
        return {}
    return {"findings": [dict(f) for f in getattr(decision, "findings", ())],
            "summary": dict(getattr(decision, "summary", {}) or {})}


# --- baseline evidence shared with a reference certificate ----------------------------------

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


# --- structural comparison with tolerance ---------------------------------------------------

def _diff(path: str, stored: Any, recomputed: Any) -> Iterator[tuple[str, str]]:
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
                yield from _diff(sub, stored[key], recomputed[key])
        return
    if isinstance(recomputed, (list, tuple)):
        if not isinstance(stored, (list, tuple)) or len(stored) != len(recomputed):
            yield path, f"certificate has {_show(stored)}, recomputed {_show(recomputed)}"
            return
        shown = 0
        for i, (a, b) in enumerate(zip(stored, recomputed, strict=True)):
            for item in _diff(f"{path}[{i}]", a, b):
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
