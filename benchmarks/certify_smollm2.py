"""Benchmark: certify SmolLM2-135M with its INT8 RTN edit and print what it cost.

Runs `invarlock certify` twice as a separate process (dev profile: 64 + 64 windows of 128
tokens, on the bundled demo corpus) with a fresh baseline cache: the first run evaluates
the baseline, the second reuses the cached baseline results. Prints wall time, evaluation
tokens per second, peak resident memory, the guard share of the wall time and the verdicts.

The guard share is measured two ways: the guards' own stages in the certificate's timings,
and (with `--guards-off`) a third run with every guard off and a fresh cache, so the cost of
the activation hooks inside the evaluation passes is counted too.

    python benchmarks/certify_smollm2.py --model .cache/models/smollm2-135m
(`make bench` prepares the model and runs this.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(model: Path, out: Path, cache: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "invarlock", "certify", "--baseline", str(model),
           "--edit", "quant_rtn", "--dataset", "demo", "--profile", "dev", "--out", str(out),
           "--cache-dir", str(cache), "--json", "--quiet", *extra]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if code not in (0, 1):
            sys.exit(f"certify failed ({code}):\n{stderr.read()}")
        summary = json.loads(stdout.read())
    cert = json.loads(Path(summary["certificate"]).read_text())
    return {"wall": wall, "peak_mib": usage.ru_maxrss / 1024, "summary": summary, "cert": cert}


def eval_tokens_per_second(cert: dict) -> float | None:
    timings = cert["timings"]
    seconds = sum(v for k, v in timings.items() if k.endswith("_eval_s"))
    tokens = 0
    for name in ("preview", "final"):
        per_window = sum(cert["windows"][name]["tokens"])
        evaluated_subject = bool(cert["windows"][name]["subject"])
        from_cache = cert["baseline"]["results_from_cache"]
        tokens += per_window * ((0 if from_cache else 1) + (1 if evaluated_subject else 0))
    return tokens / seconds if seconds else None


def report(label: str, result: dict) -> None:
    cert = result["cert"]
    timings = cert["timings"]
    tps = eval_tokens_per_second(cert)
    guards_s = sum(v for k, v in timings.items() if k.startswith("guard"))
    print(f"{label}:")
    print(f"  verdict             {result['summary']['verdict']} (ratio "
          f"{result['summary']['ratio']:.4f}, CI {result['summary']['ratio_ci']})")
    print(f"  wall time           {result['wall']:.1f} s (in-process total "
          f"{timings['total_s']:.1f} s)")
    print(f"  baseline from cache {cert['baseline']['results_from_cache']}")
    print(f"  evaluation          {tps:,.0f} tokens/s" if tps else "  evaluation          -")
    if guards_s:
        share = 100 * guards_s / timings["total_s"]
        print(f"  guards              {guards_s:.1f} s = {share:.1f}% of the certify wall time")
    print(f"  peak RSS            {result['peak_mib']:,.0f} MiB")
    print("  stages              " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (OMP_NUM_THREADS) for the child process")
    parser.add_argument("--guards-off", action="store_true",
                        help="also time a first run with every guard off")
    parser.add_argument("extra", nargs="*", help="extra certify flags")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        first = run_once(args.model, tmp_path / "run1", tmp_path / "cache", args.extra)
        second = run_once(args.model, tmp_path / "run2", tmp_path / "cache", args.extra)
        bare = None
        if args.guards_off:
            preset = tmp_path / "guards-off.yaml"
            preset.write_text("guards:\n" + "".join(
                f"  {name}: {{mode: \"off\"}}\n"
                for name in ("invariants", "spectral", "rmt", "variance")))
            bare = run_once(args.model, tmp_path / "run3", tmp_path / "cache-off",
                            [*args.extra, "--preset", str(preset)])
    print(f"SmolLM2-135M, INT8 quant_rtn, dev profile ({os.cpu_count()} CPUs visible)")
    report("first run (baseline evaluated)", first)
    report("second run (baseline cached)", second)
    if bare is not None:
        report("first run with every guard off", bare)
        added = first["wall"] / bare["wall"] - 1
        print(f"guards add {100 * added:.1f}% to the first run's wall time "
              f"({bare['wall']:.1f} s -> {first['wall']:.1f} s)")


if __name__ == "__main__":
    main()
