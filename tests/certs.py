"""Schema-valid certificates from synthetic per-window arrays, for tests that need one
without running models (rendering, publishing, verification).

Numbers and flags come from the real gate functions, so they are internally consistent.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from invarlock import gate
from invarlock.certificate import document
from invarlock.certificate import markdown as md
from invarlock.enums import MetricKind
from invarlock.policy import evidence_floor, profiles, resolve


def _arrays(rng: np.random.Generator, n: int, shift: float, kind: MetricKind):
    if kind is MetricKind.ACCURACY:
        base = (rng.random(n) < 0.8).astype(float)
        subj = base.copy()
        flips = round(abs(shift) * n)
        subj[:flips] = 0.0
        return np.ones(n, dtype=np.int64), base, subj
    # A causal window of 128 tokens scores 127; a masked-LM window ~15% of its positions.
    tokens = np.full(n, 127 if kind is MetricKind.PPL_CAUSAL else 19, dtype=np.int64)
    base = tokens * rng.normal(3.0, 0.2, n)
    subj = base + tokens * (shift + rng.normal(0, 0.01, n))
    return tokens, base, subj


def synthetic_certificate(*, shift: float = 0.0, n: int = 32, seed: int = 0,
                          kind: MetricKind = MetricKind.PPL_CAUSAL, tier: str = "balanced",
                          profile: str = "dev", replicates: int = 200) -> dict[str, Any]:
    """A sealed certificate whose subject is `shift` nats/token worse (or `shift` accuracy)."""
    rng = np.random.default_rng(seed)
    floor = evidence_floor(profile)
    underpowered = floor.below_floor == "refuse" and (
        n < floor.final_n or replicates < floor.replicates or floor.seq_len > 128)
    design = profiles()[profile].get("sequential") or {}
    fixed = {"sequential": False} if design.get("enabled") and n > design["n_min"] else {}
    policy = resolve({"auto": {"tier": tier, "profile": profile, **fixed,
                               "allow_underpowered": underpowered},
                      "dataset": {"preview_n": n, "final_n": n, "seq_len": 128},
                      "eval": {"bootstrap": {"replicates": replicates}}})
    sets = {name: _arrays(rng, n, shift, kind) for name in ("preview", "final")}
    paired = {k: gate.PairedArrays(*v) for k, v in sets.items()}
    prev_summary = gate.summarize(kind, paired["preview"])
    catastrophic = gate.is_catastrophic(kind, prev_summary, policy.primary_metric)
    final = None if catastrophic else paired["final"]
    pm = gate.primary_metric(kind, paired["preview"], final, policy.primary_metric,
                             policy.bootstrap)
    evidence = gate.Evidence(floor, n, n, 128, replicates, (n, n), underpowered)
    checks = [gate.pairing_check(1.0, 0.0, n, n), *gate.primary_checks(pm, policy.primary_metric),
              evidence.check()]
    decision = gate.decide(checks, gate.primary_gating(floor))
    ids = rng.permutation(4 * n)

    def window_set(name: str, offset: int) -> dict[str, Any]:
        tokens, base, subj = sets[name]
        evaluated = name == "preview" or not catastrophic
        return {
            "ids": [int(i) for i in ids[offset:offset + n]],
            "sha256": [hashlib.sha256(f"{name}{i}".encode()).hexdigest() for i in range(n)],
            "tokens": [int(t) for t in tokens] if evaluated else [],
            "baseline": [float(v) for v in base] if evaluated else [],
            "subject": [float(v) for v in subj] if evaluated else [],
        }

    digest = "sha256:" + "ab" * 32
    adapter = {MetricKind.PPL_CAUSAL: "hf_causal", MetricKind.PPL_MLM: "hf_mlm",
               MetricKind.ACCURACY: "hf_seq_cls"}[kind]
    model = {"source": "models/base", "kind": "local", "path": "models/base",
             "revision": None, "adapter": adapter, "architecture": "GPT2LMHeadModel",
             "model_type": "gpt2", "dtype": "float32", "parameters": 1_000_000,
             "weights_digest": digest, "digest_basis": "files", "results_from_cache": False,
             "produced_by": None}
    cert = {
        "format": "invarlock.certificate", "schema_version": 1,
        "run_id": f"20261121T000000Z-{seed:08x}", "created_at": "2026-11-21T00:00:00Z",
        "tool": {"name": "invarlock", "version": "0.1.0"},
        "environment": {"python": "3.11.7", "platform": "Linux", "libraries": {"torch": "2.13.0"},
                        "device": {"type": "cpu", "name": "cpu", "threads": 2}},
        "seeds": {"windows": 42, "bootstrap": 42, "torch": 42, "numpy": 42, "python": 42},
        "baseline": model,
        "subject": {**model, "source": "models/subject", "path": "models/subject",
                    "weights_digest": "sha256:" + "cd" * 32},
        "tokenizer": {"hash": digest, "class": "GPT2TokenizerFast", "vocab_size": 2048,
                      "identical": True},
        "dataset": {"spec": "eval.txt", "provider": "text", "digest": digest, "documents": 3,
                    "tokens": 4 * n * 128},
        "windows": {"kind": str(kind), "seq_len": 128, "stride": 128, "seed": 42,
                    "available": 4 * n, "duplicates_dropped": 0,
                    "requested": {"preview_n": n, "final_n": n}, "plan_digest": digest,
                    "preview": window_set("preview", 0), "final": window_set("final", n)},
        "pairing": {"match": 1.0, "overlap": 0.0, "preview_n": n, "final_n": n,
                    "final_evaluated": not catastrophic},
        "edit": None,
        "primary_metric": pm.as_dict(),
        "evidence": evidence.as_dict(),
        "policy": policy.as_dict(),
        "guards": {},
        "validation": decision.validation,
        "gating": list(decision.gating),
        "verdict": decision.verdict_section(),
        "artifacts": {"markdown": document.MARKDOWN_FILENAME, "saved_subject": None},
        "timings": {"total_s": 1.0},
    }
    return document.seal(cert)


def render(cert: dict[str, Any]) -> str:
    return md.render(cert)
