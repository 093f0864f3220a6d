"""False alarms on benign edits and detections of harmful ones, per zoo family and guard.

Certifies every family of the edit zoo (`invarlock/calibration/zoo.py`: benign RTN 8-bit per
channel and per group, fp16/bf16 round trips, INT8-step noise, 2–10% magnitude pruning,
norm-fold rescalings of one/some/all layers, small low-rank merges, 4-bit RTN g128,
GPTQ-style 4-bit, q/k, value/output and up/down rescalings and their sign flips, AWQ-style
scale-then-4-bit, 2:4 and Wanda pruning; harmful ×3 matrix, halved output projection, ×25
outlier rows, whole family ×1.5, swapped layers, 4-bit RTN, a NaN, permuted / zeroed /
spiked embedding rows of tokens the windows never contain) over seeds, against one baseline
evaluated once (shared cache, one process), under a tier (balanced by default). `--reuse`
decides certificates already in OUT/runs/ again under the current policy instead of
certifying them anew (the decisions are pure), so seeds can be added run by run.
`--text-calibration` has the data-aware families (GPTQ, Wanda, AWQ-style scales) calibrate
on up to 64 windows of the dataset that neither evaluation set contains, as a real quantizer
is calibrated on text; by default they draw seeded random tokens. On a benign edit any guard
that fails is a false alarm; on a harmful edit a failing guard is a detection. Prints both
tables as markdown and writes every run to OUT/zoo.csv and OUT/zoo.json as soon as it ends.

The catastrophic-preview stop is disabled here (`catastrophic_ratio` 1000) so that every
guard measures every harmful edit; the window counts are small (`--windows`, default 24
preview + 24 final of the profile's length, K = 16 calibration windows): the guards' null
comes from the K windows, the primary metric's interval is wider than in a real run. Both
fall short of the profile (a looser catastrophic limit, fewer windows), so the preset allows
underpowered runs: every row records `evidence_meets_profile: false` (`evidence_ok`).

    python scripts/false_alarm_rate.py --baseline demo --seeds 20 --out zoo/demo
    python scripts/false_alarm_rate.py --baseline .cache/models/smollm2-135m \
        --dataset demo --seeds 20 --out zoo/smollm2
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from invarlock.calibration.zoo_run import BENIGN, GUARDS, HARMFUL


def run(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from invarlock.calibration.zoo_run import certify_zoo
    from invarlock.run_config import config_from_certify_flags, request_from_config

    preset = out / "zoo-windows.yaml"
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text(f"dataset: {{preview_n: {args.windows}, final_n: {args.windows}}}\n"
                      f"guards: {{calibration_windows: {args.k}}}\n"
                      "eval: {primary_metric: {catastrophic_ratio: 1000.0}}\n"
                      "auto: {allow_underpowered: true}\n")
    config = config_from_certify_flags({
        "baseline": args.baseline, "dataset_spec": args.dataset, "tier": args.tier,
        "profile": args.profile, "presets": (preset, *args.preset), "edit_name": "quant_rtn"})
    base = request_from_config(config)
    rows: list[dict[str, Any]] = []

    def written(row: dict[str, Any]) -> None:  # OUT/zoo.csv grows run by run
        rows.append(row)
        write(rows, out)

    benign = [f for f in args.families if f in BENIGN]
    harmful = [f for f in args.families if f in HARMFUL]
    if benign:
        certify_zoo(base, config, benign, args.seeds, out, args.first_seed,
                    reuse=args.reuse, on_row=written, text_calibration=args.text_calibration)
    if harmful:
        certify_zoo(base, config, harmful, args.harmful_seeds or args.seeds, out,
                    args.first_seed, reuse=args.reuse, on_row=written)
    return rows


def tables(rows: list[dict[str, Any]]) -> str:
    from invarlock.calibration.zoo_run import rates

    lines = []
    table = rates(rows)
    benign = [t for t in table if t["kind"] == "benign"]
    harmful = [t for t in table if t["kind"] == "harmful"]
    if benign:
        lines += ["False alarms (runs failed by each guard) on benign edits:", "",
                  "| Family | Runs | " + " | ".join(GUARDS) + " | primary | verdict FAIL | "
                  "PPL ratio |", "|---|---:|" + "---:|" * (len(GUARDS) + 2) + "---|"]
        lines += [f"| {t['family']} | {t['runs']} | " + " | ".join(
            str(t[g]) for g in GUARDS) + f" | {t['primary']} | {t['verdict_fail']} | "
            f"{_ratio(t)} |" for t in benign]
        lines.append("")
    if harmful:
        lines += ["Detections (runs failed by each guard) on harmful edits:", "",
                  "| Family | Runs | " + " | ".join(GUARDS) + " | primary | verdict FAIL | "
                  "PPL ratio |", "|---|---:|" + "---:|" * (len(GUARDS) + 2) + "---|"]
        lines += [f"| {t['family']} | {t['runs']} | " + " | ".join(
            f"{t[g]}/{t['runs']}" for g in GUARDS) + f" | {t['primary']}/{t['runs']} | "
            f"{t['verdict_fail']}/{t['runs']} | {_ratio(t)} |" for t in harmful]
    return "\n".join(lines)


def _ratio(t: dict[str, Any]) -> str:
    if t["ratio_min"] is None:
        return "—"
    return f"{t['ratio_min']:.4f}–{t['ratio_max']:.4f}"


def write(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "zoo.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (";".join(v) if isinstance(v, list) else v)
                          for k, v in r.items()} for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="demo")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--seeds", type=int, default=20, help="seeds per benign family")
    parser.add_argument("--harmful-seeds", type=int, default=None,
                        help="seeds per harmful family (default: --seeds)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--families", default=",".join(BENIGN + HARMFUL),
                        help="comma-separated zoo families (default: all)")
    parser.add_argument("--windows", type=int, default=24, help="preview and final windows")
    parser.add_argument("--k", type=int, default=16, help="calibration windows (RMT, VE)")
    parser.add_argument("--tier", default="balanced")
    parser.add_argument("--profile", default="dev")
    parser.add_argument("--preset", action="append", type=Path, default=[])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="decide certificates already in OUT/runs/ again instead of "
                             "certifying those runs anew")
    parser.add_argument("--text-calibration", action="store_true",
                        help="GPTQ, Wanda and the AWQ-style families calibrate on held-out "
                             "windows of the dataset instead of seeded random tokens")
    args = parser.parse_args()
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in BENIGN + HARMFUL]
    if unknown:
        parser.error(f"unknown families: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = run(args, out)
        write(rows, out)
    print(f"edit zoo on {args.baseline}, {args.tier} tier, {args.profile} profile, "
          f"{args.windows}+{args.windows} windows, K={args.k}")
    print(tables(rows))
    worst = max((sum(1 for r in rows if r["family"] == f and r[g] is False) /
                 max(1, sum(1 for r in rows if r["family"] == f))
                 for f in BENIGN for g in GUARDS), default=0.0)
    sys.exit(0 if worst <= 1 / 20 else 1)


if __name__ == "__main__":
    main()
