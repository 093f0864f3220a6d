"""The certificate's content, assembled from what the pipeline measured and decided.

Every section the schema describes is built here from plain values, so the certificate's shape
lives in one place beside its schema, digest and renderings. Nothing here loads or scores a
model: the pipeline hands over records, per-window results and the gate's objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from invarlock import __version__
from invarlock.certificate.document import MARKDOWN_FILENAME
from invarlock.environment import describe as describe_host

if TYPE_CHECKING:
    from invarlock.data.corpus import Corpus
    from invarlock.data.windows import WindowPlan, WindowSet
    from invarlock.gate import Decision, Evidence, PrimaryMetricResult
    from invarlock.policy import ResolvedPolicy


@dataclass(frozen=True)
class Side:
    """One model as the certificate shows it: its record and its per-window results."""

    record: dict[str, Any]  # the certificate's `baseline` or `subject` section
    sets: Mapping[str, Any]  # "preview"/"final" → WindowScores; a set not evaluated is None


def build_certificate(*, run_id: str, environment: dict[str, Any], policy: ResolvedPolicy,
                      tokenizer: Any, tokenizer_hash: str, corpus: Corpus,
                      windows: WindowPlan, baseline: Side, subject: Side,
                      edit: dict[str, Any] | None, guards: dict[str, dict[str, Any]],
                      match: float, primary: PrimaryMetricResult, evidence: Evidence,
                      decision: Decision, artifacts: dict[str, str | None],
                      timings: dict[str, float],
                      reference: dict[str, Any] | None = None,
                      distribution: dict[str, Any] | None = None,
                      sequential: dict[str, Any] | None = None) -> dict[str, Any]:
    """The certificate's content (unsealed): every section the schema describes.

    `tokenizer` is the loaded baseline tokenizer (its class and vocabulary are recorded);
    `match` is the share of windows both models were fed exactly as planned; `primary`,
    `evidence` and `decision` are the gate's results the verdict rests on; `reference`
    (invarlock.provenance.record) says where the baseline, data, presets and policy came from;
    `distribution` (invarlock.distribution.summarize) is the subject's distribution evidence.
    """
    wp = policy.windows
    return {
        "format": "invarlock.certificate",
        "schema_version": 1,
        "run_id": run_id,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": {"name": "invarlock", "version": __version__},
        "environment": environment,
        "seeds": {"windows": wp.seed, "bootstrap": policy.bootstrap.seed,
                  "torch": wp.seed, "numpy": wp.seed, "python": wp.seed},
        "baseline": baseline.record,
        "subject": subject.record,
        "tokenizer": {"hash": tokenizer_hash, "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer), "identical": True},
        "dataset": {"spec": corpus.source.spec(), "provider": corpus.source.provider,
                    "digest": corpus.digest, "documents": len(corpus.documents),
                    "tokens": int(windows.total_tokens),
                    "vocabulary": windows.vocabulary_coverage(len(tokenizer))},
        "windows": windows_section(windows, baseline.sets, subject.sets),
        "pairing": {"match": match, "overlap": windows.overlap(),
                    "preview_n": windows.preview.n, "final_n": windows.final.n,
                    "final_evaluated": subject.sets["final"] is not None},
        "edit": edit,
        "primary_metric": primary.as_dict(),
        "evidence": evidence.as_dict(),
        "policy": policy.as_dict(),
        "guards": guards,
        "validation": decision.validation,
        "gating": list(decision.gating),
        "verdict": decision.verdict_section(),
        "artifacts": {"markdown": MARKDOWN_FILENAME, **artifacts},
        "timings": timings,
        **({"reference": reference} if reference is not None else {}),
        **({"distribution": distribution} if distribution is not None else {}),
        **({"sequential": sequential} if sequential is not None else {}),
    }


def environment_section(device: dict[str, Any], config: dict[str, Any], adapter: str,
                        edit_name: str | None) -> dict[str, Any]:
    """Where the run happened; plugin distributions that loaded or edited a model included."""
    from invarlock import catalog

    described = describe_host(device)
    described["libraries"].update(catalog.distributions_in_use(config, adapter, edit_name))
    return described


def model_record(src: Any, config: dict[str, Any], adapter: Any, digest: str, basis: str, *,
                 dtype: str, parameters: int, from_cache: bool = False,
                 produced_by: str | None = None) -> dict[str, Any]:
    """The `baseline`/`subject` section: which checkpoint, what kind, and its weights' digest.

    `src` is an invarlock.models.source.ModelSource; `basis` says whether the digest covers
    the files on disk or the tensors in memory.
    """
    archs = config.get("architectures") or ["unknown"]
    return {
        "source": src.spec, "kind": src.kind,
        "path": str(src.path) if src.path else None, "revision": src.revision,
        "adapter": str(adapter), "architecture": str(archs[0]),
        "model_type": str(config.get("model_type", "unknown")), "dtype": dtype,
        "parameters": int(parameters), "weights_digest": digest, "digest_basis": basis,
        "results_from_cache": from_cache, "produced_by": produced_by,
    }


def edit_record(result: Any) -> dict[str, Any]:
    """The `edit` section from an invarlock.edits.EditResult: what the edit changed."""
    return {"name": result.name, "plan": result.plan,
            "modules_changed": list(result.modules_changed),
            "params_changed": int(result.params_changed),
            "max_abs_error": float(result.max_abs_error)}


def windows_section(plan: WindowPlan, base_sets: Mapping[str, Any],
                     subj_sets: Mapping[str, Any]) -> dict[str, Any]:
    """The plan (ids, hashes) and each side's values on the windows the subject was
    evaluated on (a prefix of each set: the design's preview cut, the final windows up to
    the look that decided), so a verifier can recompute the interval; a subject window
    that broke is null."""
    def one(name: str) -> dict[str, Any]:
        windows: WindowSet = getattr(plan, name)
        base, subj = base_sets[name], subj_sets[name]
        return {
            "ids": [int(i) for i in windows.window_ids],
            "sha256": list(windows.sha256),
            "tokens": [int(n) for n in base.tokens],
            "baseline": [float(v) for v in base.values],
            "subject": [] if subj is None else [
                float(v) if np.isfinite(v) else None for v in subj.values],
        }

    return {
        "kind": str(plan.kind), "seq_len": plan.seq_len, "stride": plan.stride,
        "seed": plan.seed, "available": int(plan.available),
        "duplicates_dropped": int(plan.duplicates_dropped),
        "requested": {"preview_n": plan.requested[0], "final_n": plan.requested[1]},
        "plan_digest": plan.digest, "preview": one("preview"), "final": one("final"),
    }
