"""Guard sections in the certificate's shape (`cert["guards"][name]`), for rendering and
verification tests that need them without running models.

`with_guard_sections` adds them to a synthetic certificate, records their flags in
`validation` (and in `gating` for gate-mode guards) and re-derives the verdict with
`invarlock.gate.decide`, so the certificate is internally consistent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from invarlock import gate
from invarlock.certificate import document


def spectral_section(*, modules: int = 24, violations: int = 3, seed: int = 0,
                     mode: str = "gate") -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    caps = {"attn": 2.8, "ffn": 2.5, "embed": 3.0, "other": 3.0}
    entries = []
    for i in range(modules):
        block, family = divmod(i, 2)
        family_name = ("attn", "ffn")[family]
        name = (f"transformer.h.{block}.attn.c_attn" if family_name == "attn"
                else f"transformer.h.{block}.mlp.c_fc")
        z = float(rng.normal(0, 1.0))
        if i < violations:
            z = caps[family_name] + 0.5 + i * 0.3
        entries.append({"module": name, "family": family_name,
                        "relative_change": round(0.01 * z, 6), "z": round(z, 6)})
    over = [e for e in entries if abs(e["z"]) > caps[e["family"]]]
    families = {f: {"modules": sum(e["family"] == f for e in entries), "kappa": caps[f],
                    "violations": sum(e["family"] == f for e in over)} for f in ("attn", "ffn")}
    passed = len(over) <= 2
    return {
        "mode": mode, "flag": "spectral_stable", "passed": passed,
        "reason": f"{len(over)} module(s) beyond their family cap; at most 2 allowed",
        "measurements": {"modules": entries, "families": families, "max_caps": 2,
                         "deadband": 0.1},
        "findings": [{"module": e["module"], "family": e["family"],
                      "message": f"|z| {abs(e['z']):.2f} > κ {caps[e['family']]}",
                      "z": e["z"]} for e in over],
    }


def rmt_section(*, mode: str = "monitor") -> dict[str, Any]:
    families = {"attn": {"edge_baseline": 1.012, "edge_subject": 1.020, "epsilon": 0.08},
                "ffn": {"edge_baseline": 0.994, "edge_subject": 0.999, "epsilon": 0.10}}
    return {"mode": mode, "flag": "rmt_stable", "passed": True,
            "reason": "every family's edge ratio within (1 + ε) of the baseline",
            "measurements": {"families": families, "windows": 8}, "findings": []}


def with_guard_sections(cert: dict[str, Any],
                        sections: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`cert` with guard sections added, flags recorded, the verdict re-derived, resealed."""
    sections = sections if sections is not None else {"spectral": spectral_section(),
                                                      "rmt": rmt_section()}
    body = {k: v for k, v in cert.items() if k != "digest"}
    explanations = body["verdict"]["explanations"]
    checks = [gate.Check(flag, ok, explanations.get(flag, ""))
              for flag, ok in body["validation"].items()]
    checks += [gate.Check(s["flag"], s["passed"], s["reason"]) for s in sections.values()]
    gating = [*gate.PRIMARY_GATING, *(s["flag"] for s in sections.values()
                                      if s["mode"] == "gate")]
    decision = gate.decide(checks, gating)
    body.update(guards=sections, validation=decision.validation, gating=list(decision.gating),
                verdict=decision.verdict_section())
    return document.seal(body)
