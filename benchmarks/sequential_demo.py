"""Benchmark: the sequential design against the fixed design on the bundled demo model.

Three subjects, each certified twice in its own process (ci profile by default: 200 + 200
windows of 256 tokens), once with `--no-sequential` (the fixed design: every planned final
window through the subject) and once with `--sequential`, after one run that fills the
baseline cache so every measured run pays for the subject only:

- int8: quant_rtn 8-bit, a clear PASS;
- rtn2: quant_rtn 2-bit with the catastrophe limit raised so the final set is reached, a
  clear FAIL;
- borderline: INT8 against a limit at its own ratio (1.0001), undecided until the maximum.

Prints, per run: verdict, final windows evaluated of the maximum, wall time, subject
evaluation seconds, peak RSS, and the sequential run's wall time as a share of the fixed one.

    python benchmarks/sequential_demo.py [--profile ci]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from child import run_child

SUBJECTS = {
    "int8": ("{bitwidth: 8}", ""),
    "rtn2": ("{bitwidth: 2}", "eval: {primary_metric: {catastrophic_ratio: 50.0}}\n"),
    "borderline": ("{bitwidth: 8}", "eval: {primary_metric: {ratio_limit: 1.0001}}\n"),
}


def certify(tmp: Path, name: str, profile: str, cache: Path, mode: str) -> dict:
    plan, extra = SUBJECTS[name]
    edit = tmp / f"{name}.edit.yaml"
    edit.write_text(f"edit: {{name: quant_rtn, plan: {plan}}}\n")
    preset = tmp / f"{name}.preset.yaml"
    preset.write_text(extra or "{}\n")
    out = tmp / f"{name}-{mode}"
    child = run_child([sys.executable, "-m", "invarlock", "certify", "--profile", profile,
                       "--edit", "quant_rtn", "--edit-config", str(edit), "--preset",
                       str(preset), f"--{mode}", "--cache-dir", str(cache), "--out", str(out),
                       "--json", "-q"])
    if child.code not in (0, 1):
        raise SystemExit(f"{name} ({mode}) exited {child.code}: {child.stderr.strip()[-400:]}")
    cert = json.loads((out / "evaluation.cert.json").read_text(encoding="utf-8"))
    final = cert["windows"]["final"]
    return {"verdict": cert["verdict"]["status"], "used": len(final["subject"]),
            "max": len(final["ids"]), "wall": child.wall, "peak": child.peak,
            "subject_eval": cert["timings"].get("subject_eval_s", 0.0),
            "decided": (cert.get("sequential") or {}).get("reason", "fixed design")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci", choices=["dev", "ci", "release"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "cache"
        certify(tmp, "int8", args.profile, cache, "no-sequential")  # fills the cache
        print(f"{'subject':<11} {'design':<10} {'verdict':<7} {'windows':>9} {'wall s':>8} "
              f"{'eval s':>8} {'peak MiB':>9}  ratio  decision")
        for name in SUBJECTS:
            fixed = certify(tmp, name, args.profile, cache, "no-sequential")
            seq = certify(tmp, name, args.profile, cache, "sequential")
            for design, r in (("fixed", fixed), ("sequential", seq)):
                share = f"{r['wall'] / fixed['wall']:.2f}x" if design == "sequential" else "1.00x"
                print(f"{name:<11} {design:<10} {r['verdict']:<7} "
                      f"{r['used']:>4}/{r['max']:<4} {r['wall']:8.1f} {r['subject_eval']:8.1f} "
                      f"{r['peak'] / 2**20:9.0f}  {share}  {r['decided']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
