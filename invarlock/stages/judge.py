"""Stage 6: pairing, the primary metric with its interval, the distribution evidence and
every guard's check → the verdict."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from invarlock import distribution, distribution_gate, gate, sequential_run
from invarlock.data.windows import WindowPlan
from invarlock.errors import EvidenceError
from invarlock.policy import evidence_floor
from invarlock.stages.common import paired
from invarlock.stages.records import (
    WINDOW_SETS,
    BaselineEvidence,
    EvaluationPlan,
    Judgement,
    RunInputs,
    SubjectEvidence,
)


def judge(inputs: RunInputs, plan: EvaluationPlan, baseline: BaselineEvidence,
          subject: SubjectEvidence) -> Judgement:
    """Pairing, the primary metric with its interval, and every check → the verdict."""
    from invarlock.models import source

    windows = plan.windows
    evaluated, base_sets = _evaluated(windows, baseline.sets, subject.sets)
    match = _match(evaluated, base_sets, subject.sets)
    if match < 1.0:
        raise EvidenceError(f"pairing broken: only {match:.2%} of windows were fed to both "
                            "models exactly as planned")
    preview = paired(base_sets["preview"], subject.sets["preview"])
    final = (paired(base_sets["final"], subject.sets["final"])
             if subject.sets["final"] is not None else None)
    policy = inputs.policy
    design = subject.sequential.design if subject.sequential is not None else None
    pm = gate.primary_metric(inputs.kind, preview, final, policy.primary_metric,
                             sequential_run.fixed_bootstrap(policy.bootstrap, design))
    dist = _distribution_section(inputs, baseline, subject)
    limits = distribution_gate.Limits.from_policy(policy.values.get("distribution"))
    context = source.context_length(inputs.baseline.config)
    evidence = gate.Evidence(evidence_floor(policy.profile, context), windows.preview.n,
                             windows.final.n, windows.seq_len, policy.bootstrap.replicates,
                             windows.requested, policy.allow_underpowered, context,
                             policy.weakened + distribution_gate.shortfall(
                                 limits, dist is not None, inputs.kind.is_perplexity))
    checks = [gate.pairing_check(match, windows.overlap(), windows.preview.n, windows.final.n),
              *sequential_run.primary_checks(pm, policy.primary_metric, subject.sequential),
              evidence.check(),
              *([distribution_gate.check(dist["checks"])] if dist is not None else []),
              *(o.check for o in subject.outcomes)]
    decision = gate.decide(checks, [*gate.primary_gating(evidence.floor),
                                    *distribution_gate.gating(limits, dist is not None),
                                    *subject.gating])
    return Judgement(match, pm, decision, evidence, dist, base_sets)


def _evaluated(windows: WindowPlan, base_sets: dict[str, Any],
               subj_sets: dict[str, Any]) -> tuple[WindowPlan, dict[str, Any]]:
    """The plan and the baseline's results cut to the windows the subject was evaluated on
    (the design's preview cut, the final windows up to the look that decided; none of the
    final set when it was not evaluated)."""
    cut = {name: 0 if subj_sets[name] is None else len(subj_sets[name].window_ids)
           for name in WINDOW_SETS}
    plan = dataclasses.replace(windows, **{
        name: sequential_run.evaluated(getattr(windows, name), n)
        for name, n in cut.items() if subj_sets[name] is not None})
    return plan, {name: sequential_run.head_scores(base_sets[name], n)
                  for name, n in cut.items()}


def _match(plan: WindowPlan, base_sets: dict[str, Any], subj_sets: dict[str, Any]) -> float:
    """Share of evaluated windows that both models were fed exactly as planned.

    Each side's hashes come from the tensors its evaluation passed to the forward. A set the
    subject could not read at all (nothing fed, every value broken) holds no numbers to pair.
    """
    from invarlock.evaluate import planned_sha256

    same = total = 0.0
    for name, subj in subj_sets.items():
        if subj is None or (not subj.fed_sha256 and subj.nonfinite_windows == subj.n):
            continue
        windows, base = getattr(plan, name), base_sets[name]
        if not (np.array_equal(base.window_ids, windows.window_ids)
                and np.array_equal(subj.window_ids, windows.window_ids)):
            return 0.0
        planned = planned_sha256(windows)
        total += len(planned)
        same += gate.pairing_match(planned, base.fed_sha256, subj.fed_sha256) * len(planned)
    return same / total if total else 1.0


def _distribution_section(inputs: RunInputs, baseline: BaselineEvidence,
                          subject: SubjectEvidence) -> dict[str, Any] | None:
    """The subject's distribution evidence on the set the primary metric rests on (the final
    set, or the preview when the final was not evaluated); None when there is none."""
    name = "final" if subject.sets["final"] is not None else "preview"
    scores = subject.sets[name]
    comparison = getattr(scores, "distribution", None)
    if not isinstance(comparison, distribution.TokenComparison) or scores.nonfinite_windows \
            or comparison.kld.size == 0:
        return None
    boot = inputs.policy.bootstrap
    return distribution.summarize(
        comparison, set_name=name, top_k=baseline.sets[name].distribution.k,
        limits=distribution_gate.Limits.from_policy(inputs.policy.values.get("distribution")),
        replicates=boot.replicates, seed=boot.seed, alpha=boot.alpha)
