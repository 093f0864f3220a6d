"""The certificate as a document: its digest, its recorded policy, the fields that must agree
with each other and with that policy, and its format records.

These checks need only the certificate and this installation's tier/profile defaults; they
decide whether the numbers are where they belong before anything is recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock import __version__
from invarlock.certificate.document import content_digest
from invarlock.config import flatten
from invarlock.enums import AdapterKind
from invarlock.errors import ConfigError
from invarlock.gguf_types import GGUF_BITS, majority_type, mixed_types
from invarlock.policy import ResolvedPolicy, policy_digest, resolve
from invarlock.verification.findings import SETS, Findings


def stored_verdict(cert: Mapping[str, Any]) -> str | None:
    verdict = cert.get("verdict")
    status = verdict.get("status") if isinstance(verdict, Mapping) else None
    return status if status in ("PASS", "FAIL") else None


def check_digest(cert: Mapping[str, Any], found: Findings) -> None:
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

def check_policy(cert: Mapping[str, Any], found: Findings) -> ResolvedPolicy | None:
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
                           found: Findings) -> None:
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

def check_layout(cert: Mapping[str, Any], policy: ResolvedPolicy, found: Findings) -> None:
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


def check_formats(cert: Mapping[str, Any], found: Findings) -> None:
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
        if fmt["name"] == "gguf":
            for where, message in _gguf_label_problems(fmt):
                found.differ(f"{role}.format.{where}", message)
        found.notes.append(f"{role} format: {format_line(dict(fmt))}")


def _gguf_label_problems(fmt: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A GGUF record's labels (file_type, bits, mixed_types) re-derived from its own
    `tensor_parameters`, by the rule that wrote them (`invarlock.gguf_types`); a record
    without the table (an older certificate, or a subject saved by an edit) is not checked."""
    parameters = fmt.get("tensor_parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        return []
    problems = []
    majority = majority_type(parameters)
    if fmt.get("file_type") != majority:
        problems.append(("file_type", f"{fmt.get('file_type')!r}, but most weights in "
                                      f"tensor_parameters are {majority!r}"))
    elif fmt.get("bits") != GGUF_BITS.get(majority):
        problems.append(("bits", f"{fmt.get('bits')!r}, but {majority} stores "
                                 f"{GGUF_BITS.get(majority)!r} bits"))
    if fmt.get("mixed_types") is not None and fmt["mixed_types"] != mixed_types(parameters):
        problems.append(("mixed_types", f"{fmt['mixed_types']!r}, but tensor_parameters "
                                        f"lists {sorted(k for k in parameters if k != 'F32')}"))
    return problems
