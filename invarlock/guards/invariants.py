"""Invariants guard: is the subject the same kind of model as the baseline, intact, untouched?

Checked first in the chain (`pre`, as soon as the subject is resident) and last (`post`, after
every evaluation):

pre   same config (dtype and quantization fields excepted), same parameter names and shapes,
      the same groups of tied parameters, every weight finite (in both models), identical
      tokenizers;
post  the subject's tensor fingerprint unchanged by the certification, and no non-finite
      logits seen while scoring it.

Any breach is fatal: after a failed `pre` the chain stops (the other guards are not measured)
and the run is judged on what is already known. Parameter tables themselves are not stored;
their digests and every difference are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invarlock.guards.base import BuiltinGuard, GuardDecision, Stage, unmeasured_decision

NAME = "invariants"
FLAG = "invariants_pass"
# Config keys that may legitimately differ between a baseline and its edited subject.
IGNORED_CONFIG_KEYS = ("torch_dtype", "dtype", "quantization_config", "_name_or_path",
                       "_model_name_or_path", "transformers_version", "_commit_hash")


def config_differences(baseline: Mapping[str, Any],
                       subject: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Top-level config keys whose values differ (ignored keys excepted), sorted by key."""
    keys = sorted((set(baseline) | set(subject)) - set(IGNORED_CONFIG_KEYS))
    return [{"key": k, "baseline": baseline.get(k), "subject": subject.get(k)}
            for k in keys if baseline.get(k) != subject.get(k)]


def pre_problems(pre: Mapping[str, Any]) -> list[str]:
    """One sentence per breach found before evaluation (empty when intact)."""
    problems = []
    diffs = pre.get("config_differences", [])
    if diffs:
        keys = ", ".join(d["key"] for d in diffs[:5])
        problems.append(f"config differs in {len(diffs)} key(s): {keys}")
    missing = pre.get("missing_in_subject", [])
    if missing:
        problems.append(f"{len(missing)} baseline parameter(s) missing from the subject "
                        f"(first: {missing[0]})")
    extra = pre.get("unexpected_in_subject", [])
    if extra:
        problems.append(f"{len(extra)} parameter(s) not in the baseline (first: {extra[0]})")
    shapes = pre.get("shape_mismatches", [])
    if shapes:
        s = shapes[0]
        problems.append(f"{len(shapes)} parameter shape(s) differ (first: {s['name']} "
                        f"{s['baseline']} vs {s['subject']})")
    tying = pre.get("tying", {})
    if _groups(tying.get("baseline", [])) != _groups(tying.get("subject", [])):
        problems.append("weight tying differs from the baseline")
    for who in ("subject", "baseline"):
        bad = pre.get(f"nonfinite_{who}", [])
        if bad:
            names = ", ".join(f"{b['module']} ({b['count']} values)" for b in bad[:3])
            problems.append(f"{who} has non-finite weights in {len(bad)} tensor(s): {names}")
    tok = pre.get("tokenizer", {})
    if tok.get("baseline") != tok.get("subject"):
        problems.append("tokenizers differ")
    return problems


def post_problems(post: Mapping[str, Any]) -> list[str]:
    problems = []
    if post.get("fingerprint_before") != post.get("fingerprint_after"):
        problems.append("the subject's weights changed during certification "
                        f"({post.get('fingerprint_before')} → {post.get('fingerprint_after')})")
    broken = int(post.get("nonfinite_windows", 0))
    if broken:
        problems.append(f"non-finite logits in {broken} evaluated window(s) of the subject")
    return problems


def _groups(groups: list[list[str]]) -> list[tuple[str, ...]]:
    return sorted(tuple(sorted(g)) for g in groups)


def decide(measurements: Mapping[str, Any], policy: Mapping[str, Any]) -> GuardDecision:
    """Pass iff neither phase found a breach; the reason names the first ones."""
    del policy  # invariants have no thresholds: any breach fails
    skipped = unmeasured_decision(measurements)
    if skipped is not None:
        return skipped
    pre = measurements.get("pre") or {}
    post = measurements.get("post")
    problems = pre_problems(pre)
    if post is not None:
        problems += post_problems(post)
    findings = tuple(
        {"module": b["module"], "family": b.get("family", "other"), "kind": "nonfinite",
         "message": f"{b['count']} non-finite value(s) in {b['parameter']} ({who})"}
        for who in ("subject", "baseline") for b in pre.get(f"nonfinite_{who}", []))
    if problems:
        return GuardDecision(False, "; ".join(problems), findings)
    phases = "before and after evaluation" if post is not None else "before evaluation"
    return GuardDecision(True, f"{pre.get('parameters', 0)} parameters intact {phases}: same "
                               "config, names, shapes, tying and tokenizer; all finite; "
                               "weights unchanged" if post is not None else
                         f"{pre.get('parameters', 0)} parameters intact {phases}", findings)


INVARIANTS = BuiltinGuard(
    NAME, FLAG, (Stage.STRUCTURE, Stage.END),
    measures=("config, parameter names/shapes, tying, finiteness and tokenizer of subject vs "
              "baseline when the subject loads; its weight fingerprint and logits at the end"),
    decide_fn=decide, probe_path="invarlock.guards.measure.invariants:InvariantsProbe")
