"""The reports whose rendering is kept as golden files (tests/github/golden/).

Regenerate after an intended change with `python scripts/regenerate_golden.py`, then review
the diff: these files are what reviewers see in pull requests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from invarlock.certificate import document
from invarlock.enums import MetricKind, Verdict
from invarlock.github import render
from invarlock.github.comments import BODY_LIMIT, marker
from invarlock.github.outcome import Outcome
from tests.certs import synthetic_certificate, with_reference

GOLDEN = Path(__file__).with_name("golden")
LINKS = render.Links(run_url="https://github.com/Codertocat/Hello-World/actions/runs/4242",
                     check_url="https://github.com/Codertocat/Hello-World/runs/1001",
                     artifact_name="invarlock-certificate",
                     head_sha="ec26c3e57ca3a959ca5aad62de7213c562f8c821",
                     html_report="evaluation.cert.html")
CERT_PATH = Path("/work/invarlock-report/evaluation.cert.json")


def _verdict(cert: dict[str, Any]) -> Outcome:
    verdict = Verdict(cert["verdict"]["status"])
    return Outcome(0 if verdict is Verdict.PASS else 1, verdict, cert, CERT_PATH,
                   CERT_PATH.with_suffix(".md"))


def with_guards(cert: dict[str, Any]) -> dict[str, Any]:
    """A certificate whose guard sections have the built-in guards' shape: a spectral FAIL
    with more violations than the comment lists, RMT and invariants clean."""
    violations = [{"module": f"transformer.h.{i}.mlp.c_fc.weight", "family": "ffn",
                   "kind": "violation", "message": f"σ changed {31 + i}%, z {4.2 + i / 10:.1f}",
                   "relative_change": 0.31 + i / 100, "z": 4.2 + i / 10} for i in range(12)]

    def spectral_family(modules: int, kappa: float, top_z: float, top: str, change: float,
                        rejected: bool) -> dict[str, Any]:
        return {"modules": modules, "kappa": kappa, "p_value": 0.001 if rejected else 0.8,
                "rejected": rejected, "robust_z": True, "top_z": top_z, "top_module": top,
                "max_abs_change": change}

    def rmt_family(module: str, base: int, subject: int, spread: float) -> dict[str, Any]:
        return {"modules": 12, "module": module, "epsilon": 0.05, "stable": True,
                "baseline_outliers": base, "subject_outliers": subject,
                "excess": float(subject - base), "margin": 0.05 * base + 6 * spread + 1,
                "null_spread": spread}

    guards = {
        "invariants": {"mode": "gate", "flag": "invariants_pass", "passed": True,
                       "reason": "124 parameters intact before and after evaluation",
                       "measurements": {"evaluated": True}, "findings": [], "summary": {}},
        "spectral": {
            "mode": "gate", "flag": "spectral_stable", "passed": False,
            "reason": "12 violation(s); largest: transformer.h.11.mlp.c_fc.weight",
            "measurements": {"evaluated": True}, "findings": violations,
            "summary": {"modules": 48, "violations": 12, "warnings": 0, "families": {
                "attn": spectral_family(24, 3.74, -1.91, "transformer.h.2.attn.c_proj.weight",
                                        0.0004, False),
                "ffn": spectral_family(24, 5.78, 5.3, "transformer.h.11.mlp.c_fc.weight",
                                       0.42, True)}},
        },
        "rmt": {"mode": "gate", "flag": "rmt_stable", "passed": True,
                "reason": "every family within ε", "measurements": {"evaluated": True},
                "findings": [], "summary": {"families": {
                    "attn": rmt_family("transformer.h.2.attn.c_proj", 152, 153, 1.63),
                    "ffn": rmt_family("transformer.h.0.mlp.c_proj", 191, 190, 0.96)}}},
    }
    body = {k: v for k, v in cert.items() if k != "digest"}
    return document.seal({**body, "guards": guards})


def _cases() -> dict[str, Callable[[], Outcome]]:
    return {
        # reference read from the base checkout, compared: nothing changed
        "pass": lambda: _verdict(with_reference(synthetic_certificate(shift=0.0, seed=1))),
        # reference read from the pull request, never compared with the base
        "fail": lambda: _verdict(with_reference(synthetic_certificate(shift=0.2, seed=2),
                                                "pull-request", changed=None)),
        # a certificate from before the reference was recorded
        "catastrophic": lambda: _verdict(synthetic_certificate(shift=1.5, seed=3)),
        # a local run with every digest pinned
        "accuracy": lambda: _verdict(with_reference(
            synthetic_certificate(kind=MetricKind.ACCURACY, n=64, seed=4), "local",
            changed=None, pinned=("baseline", "dataset", "policy"), presets=())),
        # an approved change of the preset
        "guards": lambda: _verdict(with_reference(
            with_guards(synthetic_certificate(shift=0.0, seed=5)), "pull-request",
            changed=("preset:presets/ci.yaml",))),
        # the sequential design: a clear PASS and a clear FAIL decided at the first look of
        # 200, and a subject at its limit that runs to the maximum
        "sequential-pass": lambda: _verdict(synthetic_certificate(shift=0.0, n=200, seed=11,
                                                                  sequential=True)),
        "sequential-fail": lambda: _verdict(synthetic_certificate(shift=0.2, n=200, seed=12,
                                                                  sequential=True)),
        "sequential-max": lambda: _verdict(synthetic_certificate(shift=0.0953, n=64, seed=7,
                                                                 sequential=True)),
        "distribution": lambda: _verdict(synthetic_certificate(shift=0.0, seed=6,
                                                               kld_scale=0.05)),
        "error-input": lambda: Outcome.failed(2, "--dataset is required unless the baseline "
                                                 "is the bundled demo"),
        "error-crash": lambda: Outcome.failed(3, "the certifier was killed by signal 9:\n"
                                                 "loading subject <models/int8>\n"
                                                 "CUDA out of memory | 79.1 GiB in use"),
    }


CASES = _cases()


def rendered(name: str) -> dict[str, str]:
    """File name -> content for one case: the PR comment and the check run's title."""
    report = render.Report("InvarLock", CASES[name](), LINKS)
    line = marker(report.check_name)
    return {
        f"{name}.comment.md": line + "\n" + render.comment(report, BODY_LIMIT - len(line) - 1)
        + "\n",
        f"{name}.title.txt": render.title(report) + "\n",
    }


def all_rendered() -> dict[str, str]:
    files: dict[str, str] = {}
    for name in CASES:
        files.update(rendered(name))
    return files


def write_all() -> list[Path]:
    GOLDEN.mkdir(exist_ok=True)
    written = []
    for filename, text in all_rendered().items():
        path = GOLDEN / filename
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written



