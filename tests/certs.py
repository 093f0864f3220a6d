"""Schema-valid certificates from synthetic per-window arrays, for tests that need one
without running models (rendering, publishing, verification).

Numbers and flags come from the real gate functions, so they are internally consistent.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from invarlock import distribution, distribution_gate, gate, sequential_run
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
                          profile: str = "dev", replicates: int = 200,
                          sequential: bool = False,
                          kld_scale: float | None = None) -> dict[str, Any]:
    """A sealed certificate whose subject is `shift` nats/token worse (or `shift` accuracy).

    `sequential`: the final set runs under the profile's sequential design (n must exceed
    its n_min) and stops at the first look that decides, as certify does; otherwise the
    fixed design. With `kld_scale`, distribution evidence whose per-token KLD has that
    median."""
    rng = np.random.default_rng(seed)
    floor = evidence_floor(profile)
    underpowered = floor.below_floor == "refuse" and (
        n < floor.final_n or replicates < floor.replicates or floor.seq_len > 128)
    design = profiles()[profile].get("sequential") or {}
    on = bool(design.get("enabled")) and n > design["n_min"]
    if sequential and not on:
        raise ValueError(f"the {profile} profile runs no sequential design over {n} windows")
    fixed = {"sequential": False} if on and not sequential else {}
    policy = resolve({"auto": {"tier": tier, "profile": profile, **fixed,
                               "allow_underpowered": underpowered},
                      "dataset": {"preview_n": n, "final_n": n, "seq_len": 128},
                      "eval": {"bootstrap": {"replicates": replicates}}})
    sets = {name: _arrays(rng, n, shift, kind) for name in ("preview", "final")}
    # a design scores only its preview cut, as certify does; the fixed design all of it
    previewed = sequential_run.preview_needed(
        sequential_run.design_for(policy, n, n) if sequential else None, n)
    preview = gate.PairedArrays(*(a[:previewed] for a in sets["preview"]))
    prev_summary = gate.summarize(kind, preview)
    catastrophic = gate.is_catastrophic(kind, prev_summary, policy.primary_metric)
    looks = _looks(kind, policy, preview, sets, n) if sequential and not catastrophic else None
    evaluated = n if looks is None else looks.stopped_at
    final = None if catastrophic else gate.PairedArrays(*(a[:evaluated] for a in sets["final"]))
    pm = gate.primary_metric(kind, preview, final, policy.primary_metric,
                             sequential_run.fixed_bootstrap(
                                 policy.bootstrap, looks.design if looks else None))
    ids = rng.permutation(4 * n)
    limits = distribution_gate.Limits.from_policy(policy.values.get("distribution"))
    dist = (None if kld_scale is None or final is None else
            _distribution(rng, ids[n:n + evaluated], sets["final"][0][:evaluated], kld_scale,
                          limits))
    # without distribution evidence where the tier limits it, certify records the shortfall
    unmeasured = distribution_gate.shortfall(limits, measured=dist is not None,
                                             language_model=kind.is_perplexity)
    evidence = gate.Evidence(floor, n, n, 128, replicates, (n, n), underpowered,
                             weakened=unmeasured)
    checks = [gate.pairing_check(1.0, 0.0, n, n),
              *sequential_run.primary_checks(pm, policy.primary_metric, looks),
              evidence.check(),
              *([distribution_gate.check(dist["checks"])] if dist is not None else [])]
    decision = gate.decide(checks, [*gate.primary_gating(floor),
                                    *distribution_gate.gating(limits, dist is not None)])

    def window_set(name: str, offset: int) -> dict[str, Any]:
        tokens, base, subj = sets[name]
        scored = previewed if name == "preview" else 0 if catastrophic else evaluated
        return {
            "ids": [int(i) for i in ids[offset:offset + n]],
            "sha256": [hashlib.sha256(f"{name}{i}".encode()).hexdigest() for i in range(n)],
            # the baseline is evaluated on the windows the subject is: a prefix of the plan
            "tokens": [int(t) for t in tokens[:scored]],
            "baseline": [float(v) for v in base[:scored]],
            "subject": [float(v) for v in subj[:scored]],
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
        **({"sequential": sequential_run.section(looks)} if looks else {}),
        **({"distribution": dist} if dist is not None else {}),
    }
    return document.seal(cert)


def _looks(kind: MetricKind, policy: Any, preview: gate.PairedArrays, sets: dict[str, Any],
           n: int) -> sequential_run.SequentialOutcome:
    """The sequence as certify runs it: the looks over the final differences in order, the
    run cut at the first look that decides (or at the maximum); the standard-deviation floor
    from the preview windows scored."""
    design = sequential_run.design_for(policy, n, n)
    assert design is not None
    threshold = sequential_run.threshold_for(kind, policy)
    floor = sequential_run.preview_floor(kind, preview.tokens, preview.baseline,
                                         preview.subject)
    x = sequential_run.differences(kind, *sets["final"])
    stop = design.run(x, threshold=threshold, sd_floor=floor).stopped_at
    return sequential_run.sequence(design, threshold, floor, x[:stop])


def _distribution(rng: np.random.Generator, ids: np.ndarray, tokens: np.ndarray,
                  kld_scale: float, limits: distribution_gate.Limits) -> dict[str, Any]:
    """A distribution section: per-token KLD log-normal with median `kld_scale`, the top
    token kept less often as it grows."""
    tokens = np.asarray(tokens, dtype=np.int64)
    kld = kld_scale * rng.lognormal(0.0, 1.5, size=int(tokens.sum()))
    comparison = distribution.TokenComparison(
        np.asarray(ids, dtype=np.int64), tokens, kld, 1.2 * kld,
        rng.random(kld.size) > min(0.9, 2 * kld_scale), rng.normal(0, kld_scale, kld.size))
    return distribution.summarize(comparison, set_name="final", top_k=64, limits=limits,
                                  replicates=200, seed=42, alpha=0.05)


def render(cert: dict[str, Any]) -> str:
    return md.render(cert)


def with_reference(cert: dict[str, Any], origin: str = "base-checkout", *,
                   changed: tuple[str, ...] | None = (), pinned: tuple[str, ...] = (),
                   presets: tuple[str, ...] = ("presets/ci.yaml",)) -> dict[str, Any]:
    """`cert` with the `reference` section the certifier records (resealed): every item read
    from `origin`, those in `pinned` matching a pin, `changed` as --reference-changed names
    items (None: not compared)."""
    preset_digest = "sha256:" + "5c" * 32

    def flag(name: str) -> dict[str, bool]:
        return {} if changed is None else {"changed": name in changed}

    def item(name: str, digest: str) -> dict[str, Any]:
        return {"origin": "pinned-digest" if name in pinned else origin, "digest": digest,
                **flag(name)}

    section = {
        "origin": origin,
        "baseline": item("baseline", cert["baseline"]["weights_digest"]),
        "dataset": item("dataset", cert["dataset"]["digest"]),
        "policy": item("policy", cert["policy"]["digest"]),
        "presets": [{"path": p, "origin": origin, "digest": preset_digest,
                     **flag(f"preset:{p}")} for p in presets],
    }
    if changed is not None:
        section["policy"]["changed"] = any(f"preset:{p}" in changed for p in presets)
    body = {k: v for k, v in cert.items() if k != "digest"}
    return document.seal({**body, "reference": section})
