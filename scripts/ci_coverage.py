"""Coverage of the BCa interval on real per-window deltas, at the dev and ci window counts.

The population is the per-window log-loss deltas (subject NLL sum − baseline NLL sum, and the
tokens scored) of every window of a real certificate: SmolLM2-135M against its INT8 RTN edit
(`scripts/data/smollm2_int8_window_deltas.csv`). Each simulated run draws n windows with
replacement from that population, computes the 95% BCa interval of Δ̄ = ΣΔ / Σtokens exactly
as `certify` does (`invarlock.stats.bca_ratio_of_sums`, the profile's replicates), and checks
whether it contains the population's own Δ̄ — the true value of the simulated runs. Coverage
must be at least 94% at nominal 95%; the script exits 1 when it is not.

    python scripts/ci_coverage.py                      # dev (64) and ci (200), 2000 runs each
    python scripts/ci_coverage.py --runs 5000 --counts 64 200 400

Refresh the population from a new certificate (all its preview and final windows):

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

from invarlock import stats  # noqa: E402
from invarlock.policy import profiles  # noqa: E402

DATA = ROOT / "scripts" / "data" / "smollm2_int8_window_deltas.csv"
NOMINAL, FLOOR = 0.95, 0.94


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


def coverage(delta: np.ndarray, tokens: np.ndarray, *, n: int, runs: int, replicates: int,
             seed: int = 0) -> tuple[float, float, float]:
    """(coverage, mean interval width, share missed above) over `runs` simulated runs."""
    truth = float(delta.sum() / tokens.sum())
    rng = np.random.default_rng(seed)
    hits = above = 0
    widths = np.empty(runs)
    for r in range(runs):
        idx = rng.integers(0, delta.size, size=n)
        ci = stats.bca_ratio_of_sums(delta[idx], tokens[idx], replicates=replicates,
                                     seed=seed * 1_000_003 + r)
        hits += ci.low <= truth <= ci.high
        above += truth > ci.high
        widths[r] = ci.high - ci.low
    return hits / runs, float(widths.mean()), above / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--from-certificate", type=Path,
                        help="read the population from this certificate (file or folder)")
    parser.add_argument("--write-data", action="store_true",
                        help="with --from-certificate: write the population to --data")
    parser.add_argument("--counts", type=int, nargs="+",
                        help="window counts to simulate (default: the dev and ci final_n)")
    parser.add_argument("--runs", type=int, default=2000, help="simulated runs per count")
    parser.add_argument("--seed", type=int, default=0)
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
    print(f"population: {delta.size} windows, true Δ̄ {truth:+.6f} nats/token (ratio "
          f"{np.exp(truth):.6f}); per-window Δ sd {per_token.std(ddof=1):.5f}, skewness "
          f"{_skew(per_token):+.2f}")

    profile_counts = {name: (int(p["windows"]["final_n"]), int(p["bootstrap"]["replicates"]))
                      for name, p in profiles().items()}
    counts = args.counts or [profile_counts["dev"][0], profile_counts["ci"][0]]
    ok = True
    for n in counts:
        replicates = next((b for c, b in profile_counts.values() if c == n),
                          profile_counts["ci"][1])
        cov, width, above = coverage(delta, tokens, n=n, runs=args.runs,
                                     replicates=replicates, seed=args.seed)
        se = (cov * (1 - cov) / args.runs) ** 0.5
        verdict = "ok" if cov >= FLOOR else "BELOW 94%"
        ok &= cov >= FLOOR
        print(f"n = {n:4d} windows, {replicates} replicates, {args.runs} runs: coverage "
              f"{100 * cov:.1f}% (± {100 * se:.1f}% MC s.e.) at nominal {100 * NOMINAL:.0f}%; "
              f"missed above {100 * above:.1f}%, below {100 * (1 - cov - above):.1f}%; "
              f"mean width {width:.5f} nats/token — {verdict}")
    return 0 if ok else 1


def _skew(x: np.ndarray) -> float:
    d = x - x.mean()
    return float((d**3).mean() / (d**2).mean() ** 1.5)


if __name__ == "__main__":
    sys.exit(main())
