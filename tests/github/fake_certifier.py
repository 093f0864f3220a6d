"""A stand-in for `invarlock certify` with the same command-line contract, for Action tests.

It accepts the certify flags the entrypoint passes, writes a real, schema-valid synthetic
certificate (tests/certs.py) into --out, prints the one JSON object and exits 0 or 1 — or
misbehaves on purpose (`--scenario error2|error3|crash|silent|hang`). `--record FILE` appends the
arguments it received, as JSON, one line per run.

Run it as `python tests/github/fake_certifier.py --scenario pass` (set as
INVARLOCK_CERTIFY_COMMAND); the entrypoint appends its own flags.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SCENARIOS = {
    "pass": {"shift": 0.0},
    "fail": {"shift": 0.2},
    "catastrophic": {"shift": 1.5},
    "accuracy-pass": {"shift": 0.0, "kind": "accuracy"},
}


def summary(cert: dict, path: Path, markdown: Path) -> dict:
    pm = cert["primary_metric"]
    return {"verdict": cert["verdict"]["status"], "kind": pm["kind"], "ratio": pm["ratio"],
            "ratio_ci": pm["ratio_ci"], "delta_ci": pm["delta"]["ci"] if pm["delta"] else None,
            "gate_value": pm["gate_value"], "basis": pm["basis"], "limit": pm["limit"],
            "catastrophic": pm["catastrophic"], "reasons": cert["verdict"]["reasons"],
            "run_id": cert["run_id"], "certificate": str(path), "markdown": str(markdown)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="pass")
    parser.add_argument("--record")
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", action="store_true")
    for flag in ("--baseline", "--subject", "--edit-config", "--dataset", "--profile", "--tier",
                 "--device", "--dtype", "--cache-namespace", "--reference-origin",
                 "--baseline-digest", "--policy-digest", "--dataset-digest"):
        parser.add_argument(flag)
    parser.add_argument("--preset", action="append", default=[])
    parser.add_argument("--reference-changed", action="append", default=None)
    args = parser.parse_args()
    if args.record:
        with open(args.record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"argv": sys.argv[1:], "env_keys": sorted(os.environ)}) + "\n")
    print("fake certifier: loading models", file=sys.stderr)
    if args.scenario == "error2":
        print("invarlock: error: --dataset is required", file=sys.stderr)
        print(json.dumps({"verdict": None, "error": "--dataset is required unless the baseline "
                                                    "is the bundled demo", "exit_code": 2}))
        return 2
    if args.scenario == "error3":
        print(json.dumps({"verdict": None, "error": "baseline and subject tokenizers differ: "
                                                    "vocab size 512 vs 520", "exit_code": 3}))
        return 3
    if args.scenario == "crash":
        print("CUDA out of memory", file=sys.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if args.scenario == "silent":
        return 0
    if args.scenario == "hang":  # a long run that is cancelled (the test sends the signal)
        print("fake certifier: evaluating", file=sys.stderr, flush=True)
        import time
        time.sleep(120)
        return 0

    from invarlock.certificate import document
    from invarlock.certificate import markdown as md
    from invarlock.enums import MetricKind
    from tests.certs import synthetic_certificate

    options = dict(SCENARIOS[args.scenario])
    kind = MetricKind(options.pop("kind", "ppl_causal"))
    cert = synthetic_certificate(kind=kind, profile=args.profile or "ci", tier=args.tier or
                                 "balanced", **options)
    if args.reference_origin:  # the section the real certifier records
        from tests.certs import with_reference

        changed = None if args.reference_changed is None else tuple(
            c for c in args.reference_changed if c != "none")
        cert = with_reference(cert, args.reference_origin, changed=changed,
                              presets=tuple(args.preset))
    out = Path(args.out)
    path = document.write_certificate(cert, out, md.render(cert))
    print(json.dumps(summary(cert, path, out / document.MARKDOWN_FILENAME)))
    return 0 if cert["verdict"]["status"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
