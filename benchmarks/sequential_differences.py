"""Per-window log-loss differences from certificates, as the sequential tests' real data.

    python benchmarks/sequential_differences.py int8=runs/int8/evaluation.cert.json \\
        rtn4=runs/rtn4/evaluation.cert.json > tests/data/sequential_demo_differences.json

Each certificate must hold both sets fully evaluated (a fixed-design run: --no-sequential);
the differences of the preview and final windows are written, preview first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def differences(cert: dict) -> list[float]:
    out: list[float] = []
    for name in ("preview", "final"):
        w = cert["windows"][name]
        if len(w["subject"]) != len(w["ids"]):
            raise SystemExit(f"the {name} set was not fully evaluated: run with --no-sequential")
        tokens = np.asarray(w["tokens"], dtype=float)
        d = (np.asarray(w["subject"], dtype=float) - np.asarray(w["baseline"], dtype=float))
        out += [float(v) for v in d / tokens]
    return out


def main(argv: list[str]) -> int:
    data: dict = {"source": {}, "differences": {}}
    for arg in argv:
        name, _, path = arg.partition("=")
        cert = json.loads(Path(path).read_text(encoding="utf-8"))
        data["differences"][name] = differences(cert)
        data["source"][name] = {
            "baseline": cert["baseline"]["source"], "edit": cert.get("edit") and {
                "name": cert["edit"]["name"], "plan": cert["edit"]["plan"]},
            "profile": cert["policy"]["profile"], "seq_len": cert["windows"]["seq_len"],
            "dataset_digest": cert["dataset"]["digest"], "ratio": cert["primary_metric"]["ratio"],
            "certificate_digest": cert.get("digest")}
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
