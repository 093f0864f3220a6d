"""One-sided coverage of the gate's upper bound, on real and hard populations of windows.

The perplexity gate passes when the upper end of the (1 − α) interval of Δ̄ is at most
log(limit): what must hold is that this bound lies below the true Δ̄ at most α/2 of the time
(2.5% at α = 0.05). For each population below and each window count (the dev and ci
profiles' final_n, with their bootstrap replicates) the script simulates `--runs` runs
(10,000 by default: Monte-Carlo s.e. 0.16 points at 2.5%) and reports the share of runs
whose upper bound missed, for BCa alone and for the interval the gate uses
(`invarlock.stats.studentized_ratio_of_sums`), computed by `invarlock.calibration.coverage`.

Populations (`scripts/data/smollm2_int8_window_deltas.csv` is the real one: every window of a
SmolLM2-135M vs INT8 RTN certificate):
- benign: the real windows, resampled; truth = their own Δ̄;
- near-limit: the real windows shifted so that the true ratio is the balanced limit 1.10;
- harmful: the real deltas' spread ×10, shifted to a true ratio of 1.20;
- heavy-tailed: Student t with 3 degrees of freedom, the real windows' standard deviation;
- skewed: lognormal (σ 0.75, skewness 3.3) with the same standard deviation;
- sparse damage: the same noise, with +0.5 nats/token in 3% of the windows.

A row "holds" when the gate's miss rate is at most 2.5% + 2 Monte-Carlo s.e. Sparse damage
the run's windows do not contain cannot be bounded by any interval: where the chance that a
run has no damaged window at all exceeds α/2, the row says so and does not count. The script
exits 1 when a counted row does not hold.

    python scripts/ci_coverage.py                       # dev (64) and ci (200), 10,000 runs
    python scripts/ci_coverage.py --runs 20000 --counts 64 200 400 --markdown
    python scripts/ci_coverage.py --populations skewed sparse --counts 64   # some rows only

Refresh the real population from a new certificate (all its preview and final windows):

    python scripts/ci_coverage.py --from-certificate runs/smollm2-int8 --write-data
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from invarlock.calibration import coverage  # noqa: E402
from invarlock.policy import profiles  # noqa: E402

DATA = ROOT / "scripts" / "data" / "smollm2_int8_window_deltas.csv"


def read_population(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(delta sums, tokens, provenance comment lines) from the committed CSV."""
    comments, rows = [], []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#"):
                comments.append(line[1:].strip())
            elif line.strip():
                rows.append(line)
    reader = csv.DictReader(rows)
    data = [(float(r["delta_nll_sum"]), int(r["tokens"])) for r in reader]
    delta = np.array([d for d, _ in data], dtype=np.float64)
    tokens = np.array([t for _, t in data], dtype=np.float64)
    return delta, tokens, comments


def population_from_certificate(cert_path: Path) -> tuple[list[tuple[str, int, float, int]],
                                                           list[str]]:
    """Rows (set, window id, Δ NLL sum, tokens) of every window the subject was scored on."""
    path = cert_path / "evaluation.cert.json" if cert_path.is_dir() else cert_path
    cert = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for name in ("preview", "final"):
        win = cert["windows"][name]
        for wid, tok, base, subj in zip(win["ids"], win["tokens"], win["baseline"],
                                        win["subject"], strict=True):
            rows.append((name, int(wid), float(subj) - float(base), int(tok)))
    subj = cert["subject"]
    header = [
        f"per-window deltas of invarlock certificate {cert['run_id']} ({cert['digest']})",
        f"baseline {cert['baseline']['source']} ({cert['baseline']['weights_digest']})",
        f"subject {subj.get('produced_by') or subj['source']}, edit plan "
        f"{json.dumps((cert.get('edit') or {}).get('plan'), sort_keys=True)}",
        f"dataset {cert['dataset']['spec']} ({cert['dataset']['digest']}), windows of "
        f"{cert['windows']['seq_len']} tokens, profile {cert['policy']['profile']}, ratio "
        f"{cert['primary_metric']['ratio']:.6f}",
    ]
    return rows, header


def write_population(rows: list[tuple[str, int, float, int]], header: list[str],
                     path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        for line in header:
            fh.write(f"# {line}\n")
        fh.write("set,window_id,delta_nll_sum,tokens\n")
        for name, wid, delta, tok in rows:
            fh.write(f"{name},{wid},{delta:.9g},{tok}\n")


def populations(delta: np.ndarray, tokens: np.ndarray) -> dict[str, coverage.Population]:
    """The populations of the module docstring, built around the real windows."""
    truth = float(delta.sum() / tokens.sum())
    per_token = delta / tokens
    sd = float(per_token.std(ddof=1))
    near = delta + (np.log(1.10) - truth) * tokens
    spread = 10.0 * (delta - truth * tokens)
    harmful = spread + np.log(1.20) * tokens
    size = round(float(tokens.mean()))
    return {
        "benign (real)": coverage.resampled(delta, tokens),
        "near-limit (real, ratio 1.10)": coverage.resampled(near, tokens),
        "harmful (real ×10 spread, ratio 1.20)": coverage.resampled(harmful, tokens),
        "heavy-tailed (t, 3 df)": coverage.synthetic("t3", mean=truth, sd=sd, tokens=size),
        "skewed (lognormal, skew 3.3)": coverage.synthetic("lognormal", mean=truth, sd=sd,
                                                           tokens=size),
        "sparse damage (3% of windows)": coverage.synthetic("sparse", mean=truth, sd=sd,
                                                            tokens=size),
    }


SPARSE_SHARE = 0.03


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--from-certificate", type=Path,
                        help="read the population from this certificate (file or folder)")
    parser.add_argument("--write-data", action="store_true",
                        help="with --from-certificate: write the population to --data")
    parser.add_argument("--counts", type=int, nargs="+",
                        help="window counts to simulate (default: the dev and ci final_n)")
    parser.add_argument("--runs", type=int, default=10_000, help="simulated runs per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--populations", nargs="+", metavar="WORD",
                        help="only the populations whose name starts with one of these words "
                             "(benign, near-limit, harmful, heavy-tailed, skewed, sparse)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    if args.from_certificate is not None:
        rows, header = population_from_certificate(args.from_certificate)
        if args.write_data:
            write_population(rows, header, args.data)
            print(f"wrote {len(rows)} windows to {args.data}")
    delta, tokens, comments = read_population(args.data)
    for line in comments:
        print(f"# {line}")
    truth = delta.sum() / tokens.sum()
    per_token = delta / tokens
    print(f"# real population: {delta.size} windows, true Δ̄ {truth:+.6f} nats/token (ratio "
          f"{np.exp(truth):.6f}); per-window Δ sd {per_token.std(ddof=1):.5f}, skewness "
          f"{_skew(per_token):+.2f}")

    profile_counts = {name: (int(p["windows"]["final_n"]), int(p["bootstrap"]["replicates"]))
                      for name, p in profiles().items()}
    counts = args.counts or [profile_counts["dev"][0], profile_counts["ci"][0]]
    alpha = float(profiles()["ci"]["bootstrap"]["alpha"])
    ok = True
    if args.markdown:
        print("| population | windows | replicates | BCa upper misses | gate upper misses "
              "| nominal | holds |")
        print("|---|---:|---:|---:|---:|---:|---|")
    chosen = {name: population for name, population in populations(delta, tokens).items()
              if not args.populations or name.startswith(tuple(args.populations))}
    if not chosen:
        parser.error(f"--populations {' '.join(args.populations)} matches no population")
    for name, population in chosen.items():
        for n in counts:
            replicates = next((b for c, b in profile_counts.values() if c == n),
                              profile_counts["ci"][1])
            rate = coverage.miss_rates(population, windows=n, runs=args.runs,
                                       replicates=replicates, alpha=alpha, seed=args.seed)
            empty = (1.0 - SPARSE_SHARE) ** n if name.startswith("sparse") else 0.0
            if empty > rate.nominal:
                verdict = f"no interval can: {100 * empty:.1f}% of runs hold no damaged window"
            else:
                verdict = "yes" if rate.holds(rate.gate) else "NO"
                ok &= rate.holds(rate.gate)
            mc = 100 * rate.mc_error()
            if args.markdown:
                print(f"| {name} | {n} | {replicates} | {100 * rate.bca:.2f}% "
                      f"| {100 * rate.gate:.2f}% | {100 * rate.nominal:.1f}% ± {mc:.2f} "
                      f"| {verdict} |", flush=True)
            else:
                print(f"{name}: n = {n}, {replicates} replicates, {args.runs} runs: upper "
                      f"bound missed {100 * rate.gate:.2f}% (BCa alone {100 * rate.bca:.2f}%) "
                      f"at nominal {100 * rate.nominal:.1f}% (MC s.e. {mc:.2f}) — {verdict}",
                      flush=True)
    return 0 if ok else 1


def _skew(x: np.ndarray) -> float:
    d = x - x.mean()
    return float((d**3).mean() / (d**2).mean() ** 1.5)


if __name__ == "__main__":
    sys.exit(main())
