"""`invarlock calibrate`: certify benign reference edits, then apply the recipe.

Every reference run is a full certification of the baseline against an in-memory benign
edit with spectral, RMT and VE in monitor mode, sharing one baseline cache so the baseline
is evaluated once. Reference edits: `rtn8` (the built-in INT8 RTN), `noise` (INT8-step
uniform noise, seeds 0..N−1), and any benign family of the edit zoo
(`invarlock.calibration.zoo`: RTN per channel/group, fp16/bf16 round trips, pruning,
norm-fold rescalings, low-rank merges, GPTQ, q/k, value and up rescalings), seeds 0..N−1
each; `zoo` stands for all of them but 50% pruning (`zoo_run.UNCALIBRATED`), which can be
named on its own.
VE's predictive gate runs in every reference run: its proposal there has no deadband and no
minimum adjustment (the clip `max_scale_step` stays), so that VE's own paired Δ — the subject
with its proposed scales against the subject as it is, per calibration window — is measured
on every benign edit, not only on the few whose variance moved past the tier's deadband; the
VE minimum effect is sized from that Δ (`recipe.ve_statistics`).
The certificates stay in `OUT/runs/` for audit; `OUT/calibration.yaml` is a preset for
`certify --preset`, `OUT/calibration.json` and `OUT/calibration.csv` hold the statistics
it came from; `OUT/rmt-null-modules.csv` holds the per-module RMT inputs of `null_tau`,
`OUT/ve-paired-windows.csv` the VE gate's per-window losses its minimum effect comes from.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from invarlock import atomic
from invarlock.calibration import distribution_limits, recipe, rmt_null
from invarlock.certificate import document
from invarlock.config import deep_merge
from invarlock.policy import resolve

log = logging.getLogger(__name__)

EDITS = ("rtn8", "noise")
RMT_MODULES_CSV = "rmt-null-modules.csv"  # RMT's (Δ_m, N_m) per module of every run
VE_WINDOWS_CSV = "ve-paired-windows.csv"  # VE gate's NLL per window, plain and scaled
ZOO = "zoo"  # every benign zoo family but the uncalibrated ones (zoo_run.UNCALIBRATED)
MONITORED = ("spectral", "rmt", "variance")
# VE proposes a scale for every block output whose second moment moved at all, so its gate
# (and the paired Δ the minimum effect comes from) runs on every reference edit.
VE_PROBE = {"deadband": 0.0, "min_abs_adjust": 0.0}


@dataclass(frozen=True)
class CalibrationRequest:
    base: Any                    # a CertifyRequest: baseline, dataset, config, device, cache
    out_dir: Path
    seeds: int = 5
    edits: tuple[str, ...] = EDITS
    margin: float = 0.1
    quantile: float = 0.95
    epsilon_floor: float = 0.01
    half_width: float = 0.001
    resume: bool = False         # reuse reference certificates already in OUT/runs/


@dataclass(frozen=True)
class CalibrationOutcome:
    calibration: recipe.Calibration
    yaml_path: Path
    json_path: Path
    csv_path: Path

    def summary(self) -> dict[str, Any]:
        return {"overrides": self.calibration.overrides, "runs": len(self.calibration.rows),
                "preset": str(self.yaml_path), "statistics": str(self.json_path),
                "table": str(self.csv_path)}


def reference_edits(edits: tuple[str, ...], seeds: int) -> list[tuple[str, dict, Any]]:
    """(label, edit section, edit implementation or None) for every reference run."""
    from invarlock.calibration.perturb import NOISE_EDIT
    from invarlock.calibration.zoo import zoo_edit
    from invarlock.calibration.zoo_run import BENIGN, CALIBRATION

    runs: list[tuple[str, dict, Any]] = []
    families = list(CALIBRATION) if ZOO in edits else [e for e in edits if e in BENIGN and
                                                        e not in EDITS]
    for family in families:
        impl = zoo_edit(family)
        runs += [(f"zoo:{family}:{s}", {"name": impl.name, "plan": {"seed": s}}, impl)
                 for s in range(seeds)]
    if "rtn8" in edits:
        runs.append(("quant_rtn:int8", {"name": "quant_rtn", "plan": {"bitwidth": 8}}, None))
    if "noise" in edits:
        runs += [(f"quant_noise:{s}", {"name": "quant_noise", "plan": {"bitwidth": 8, "seed": s}},
                  NOISE_EDIT) for s in range(seeds)]
    return runs


def run(req: CalibrationRequest) -> CalibrationOutcome:
    """Certify every reference edit, calibrate, and write the three outputs."""
    from invarlock.calibration.zoo_base import NotApplicable
    from invarlock.certify import certify

    # Reference runs measure every guard without letting one stop the run; monitor mode is
    # weaker than the tier's gate, so the run is explicitly allowed to fall short of the
    # profile (its certificates say evidence_meets_profile: false; they are not a verdict).
    monitored = {"guards": {g: {"mode": "monitor"} for g in MONITORED},
                 "auto": {"allow_underpowered": True}}
    monitored["guards"]["variance"]["discovery"] = dict(VE_PROBE)
    config = deep_merge(req.base.config, monitored)
    policy = resolve(config)
    tier_guards = policy.values["guards"]
    cache_dir = req.base.cache_dir or (req.out_dir / "cache")
    runs = []
    certificates = []
    skipped: list[dict[str, str]] = []
    sigma_quantile = float(tier_guards["spectral"]["sigma_quantile"])
    for label, section, impl in reference_edits(req.edits, req.seeds):
        run_dir = req.out_dir / "runs" / label.replace(":", "-")
        previous = _reusable(run_dir, req.base.baseline, section) if req.resume else None
        if previous is not None:
            runs.append(recipe.reference_run(label, previous, sigma_quantile))
            certificates.append(str(run_dir / document.CERT_FILENAME))
            log.info("reference %s: reusing %s", label, run_dir)
            continue
        started = time.perf_counter()
        one = replace(req.base, config={**config, "edit": section}, subject=None, edit=section,
                      edit_impl=impl, out_dir=run_dir, use_cache=True, cache_dir=cache_dir,
                      save_subject=None, write_ve_subject=None)
        try:
            outcome = certify(one)
        except NotApplicable as exc:
            if ZOO not in req.edits:  # named on its own: the user asked for this very edit
                raise
            # `zoo` means every family that applies: GPT-2's ungated MLP has no up/down pair
            log.warning("reference %s skipped: %s", label, exc)
            skipped.append({"run": label, "reason": str(exc)})
            continue
        runs.append(recipe.reference_run(label, outcome.certificate, sigma_quantile))
        certificates.append(str(outcome.path))
        log.info("reference %s: %s in %.0fs", label, outcome.verdict,
                 time.perf_counter() - started)
    settings = recipe.Settings(
        budget=int(tier_guards["spectral"]["max_caps"]), margin=req.margin,
        quantile=req.quantile, epsilon_floor=req.epsilon_floor,
        windows=min(int(tier_guards["calibration_windows"]), policy.windows.final_n),
        alpha=policy.bootstrap.alpha, sided=str(tier_guards["variance"]["gating"]["sided"]),
        half_width=req.half_width)
    result = recipe.calibrate(runs, tier_guards, settings)
    result, dist_stats = distribution_limits.calibrate(
        result, [(r.label, document.load_certificate(Path(c)))
                 for r, c in zip(runs, certificates, strict=True)], policy.tier)
    stats = {**result.statistics, "tier": policy.tier, "profile": policy.profile,
             "baseline": req.base.baseline, "dataset": req.base.dataset.spec(),
             "certificates": certificates, "skipped": skipped, "per_run": result.rows,
             "distribution": dist_stats}
    yaml_path = atomic.write_text(req.out_dir / "calibration.yaml",
                                  _yaml_text(result, stats))
    json_path = atomic.write_text(req.out_dir / "calibration.json",
                                  document.strict_json(stats, indent=2) + "\n")
    csv_path = atomic.write_text(req.out_dir / "calibration.csv", _csv_text(result.rows))
    if result.rmt_modules:
        atomic.write_text(req.out_dir / RMT_MODULES_CSV, rmt_null.module_csv(result.rmt_modules))
    if result.ve_rows:
        atomic.write_text(req.out_dir / VE_WINDOWS_CSV, _csv_text(result.ve_rows))
    return CalibrationOutcome(result, yaml_path, json_path, csv_path)


def _reusable(run_dir: Path, baseline: str, section: dict[str, Any]) -> dict[str, Any] | None:
    """A sealed reference certificate in `run_dir` for this baseline and edit, if any."""
    path = run_dir / document.CERT_FILENAME
    if not path.is_file():
        return None
    cert = document.load_certificate(path)
    if cert.get("digest") != document.content_digest(cert):
        log.warning("ignoring %s: its digest does not match its content", path)
        return None
    edit = cert.get("edit") or {}
    same_plan = all(edit.get("plan", {}).get(k) == v for k, v in section["plan"].items())
    if cert["baseline"]["source"] != baseline or edit.get("name") != section["name"] or (
            not same_plan):
        return None
    discovery = cert["policy"]["values"]["guards"]["variance"]["discovery"]
    if any(float(discovery.get(k, -1)) != v for k, v in VE_PROBE.items()):
        log.info("not reusing %s: its VE proposal was not the calibration probe's", path)
        return None
    return cert


def _yaml_text(result: recipe.Calibration, stats: dict[str, Any]) -> str:
    var = stats["variance"]
    win = stats["windows"]
    header = [
        "# Calibrated guard thresholds (invarlock calibrate); use with certify --preset.",
        f"# baseline {stats['baseline']}, dataset {stats['dataset']}, tier {stats['tier']}, "
        f"profile {stats['profile']}",
        f"# reference runs: {', '.join(stats['runs'])}",
        (f"# VE: own paired sigma_delta {var['sigma_delta']:.5f} from "
         f"{var['runs_with_gate']} run(s), K={var['windows']} windows ({var['sided']}, "
         f"alpha {var['alpha']})" if "sigma_delta" in var else f"# VE: {var['note']}"),
        (f"# RMT: null_tau {stats['rmt_null']['null_tau']} from the largest per-run null "
         f"scale {stats['rmt_null']['largest']:.4f} ({stats['rmt_null']['run']})"
         if "rmt_null" in stats else "# RMT: not measured, null_tau not calibrated"),
        (f"# windows: {win['recommended_per_set']} per set for a CI half-width of "
         f"{win['target_half_width']} nats/token" if "recommended_per_set" in win
         else f"# windows: {win['note']}"),
        "# statistics: calibration.json, calibration.csv",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(result.overrides, sort_keys=False)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
