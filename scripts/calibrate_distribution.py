"""Collect the distribution limits' inputs from zoo certificates and derive the tier limits.

Reads every `OUT/runs/zoo-<family>-<seed>/evaluation.cert.json` that
`scripts/false_alarm_rate.py --out OUT` wrote, one OUT per model, and writes one row per
run (the columns of `invarlock.calibration.distribution_limits.COLUMNS`); prints the limits
per tier and the table of policies/CALIBRATION.md.

    python scripts/calibrate_distribution.py demo=zoo/demo smollm2=zoo/smollm2 \
        --csv policies/calibration/distribution.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from invarlock.calibration import distribution_limits
from invarlock.calibration.zoo_run import BENIGN, HARMFUL, kind_of


def collect(model: str, out: Path) -> list[dict]:
    rows = []
    order = {f: i for i, f in enumerate(BENIGN + HARMFUL)}
    found = []
    for path in (out / "runs").glob("zoo-*/evaluation.cert.json"):
        family, _, seed = path.parent.name[len("zoo-"):].rpartition("-")
        if family in order:
            found.append((order[family], int(seed), family, path))
    for _, seed, family, path in sorted(found):
        cert = json.loads(path.read_text())
        rows.append(distribution_limits.row_of(model, family, kind_of(family), seed, cert))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", nargs="+", help="MODEL=OUT, the zoo's output folder")
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for item in args.zoo:
        model, _, out = item.partition("=")
        rows += collect(model, Path(out))
    text = distribution_limits.write_rows(rows)
    if args.csv is not None:
        args.csv.write_text(text)
    rows = distribution_limits.read_rows(text)
    for tier, limits in distribution_limits.derive(rows).items():
        print(tier, limits)
    print("\n".join(distribution_limits.table(rows)))


if __name__ == "__main__":
    main()
