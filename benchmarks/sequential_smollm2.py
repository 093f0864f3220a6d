"""Benchmark: sequential certify runs on SmolLM2-135M against the fixed design's forward floor.

ci profile (200 + 200 windows; the design scores 32 preview windows and stops at the first
deciding look, n_min 32, every 16 to 200) on the bundled demo corpus or `--dataset`, in one
invocation, each step in its own process:

1. the fixed design's forward floor: load the baseline and run its bare forward passes
   (logits only, certify's batch size) over every planned preview and final window; the
   floor is twice that (the subject has the baseline's architecture and the same windows);
2. `invarlock certify --edit quant_rtn`, fresh baseline cache each, so every run pays for
   its baseline: INT8 (a clear PASS), 2-bit with the catastrophe limit raised so that the
   sequence decides (a clear FAIL), and INT8 against a limit at its own ratio (borderline:
   measured from the INT8 run's final windows).

Prints per run: verdict, where it decided, windows forwarded (baseline preview + final,
subject preview + final), wall time and its ratio to the floor, and peak RSS; the machine's
load average beside each step (on a shared machine, compare ratios, not seconds).
`--blocks` forces the one-model-at-a-time schedule (as when a second model does not fit
the memory budget: certify is told no memory is free), and prints the baseline's final
blocks.

    python benchmarks/sequential_smollm2.py --model .cache/models/smollm2-135m \
        [--seq-len 512 --dataset kjv.txt] [--blocks]

The demo corpus holds about 150k SmolLM2 tokens: enough for 400 windows up to 256 tokens
(shorter than ci's 512, so those runs are underpowered, which ci records and does not gate
on). `--dataset` takes what certify's `--dataset` takes; the README's 512-token figures use
the King James Bible (public domain, about 1M SmolLM2 tokens), from Debian's bible-kjv-text,
one verse per line without its reference:

    apt-get install bible-kjv-text
    bible -f gen1:1-rev22:21 </dev/null | sed -E 's/^[^ ]+ //' > kjv.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from child import certify_command, run_child

HERE = Path(__file__).resolve()
MIB = 2**20
PLANS = {"int8": "{bitwidth: 8}", "rtn2": "{bitwidth: 2}"}


def _preset(seq_len: int, extra: str = "", *, underpowered: bool = False) -> str:
    """The ci profile at `seq_len`; shorter than its 512 (or with a limit looser than the
    profile's, `underpowered`) only as an underpowered run (the certificate says
    evidence_meets_profile: false; ci does not gate on it)."""
    under = "auto: {allow_underpowered: true}\n" if seq_len < 512 or underpowered else ""
    return f"dataset: {{seq_len: {seq_len}}}\n{under}{extra}"


def child_floor(model: str, seq_len: str, dataset: str) -> None:
    """Load the baseline and run its bare forward passes over the plan's windows."""
    import torch

    from invarlock import evaluate
    from invarlock.data.corpus import load_corpus, parse_dataset_spec
    from invarlock.data.windows import plan_windows
    from invarlock.models import loading, source, tokenizer
    from invarlock.policy import resolve

    src = source.resolve_model_source(model)
    policy = resolve({"auto": {"profile": "ci", "allow_underpowered": int(seq_len) < 512},
                      "dataset": {"seq_len": int(seq_len)}},
                     context_length=source.context_length(source.read_config(src)))
    tok = loading.load_tokenizer(src)
    wp = policy.windows
    plan = plan_windows(load_corpus(parse_dataset_spec(dataset), labelled=False), tok,
                        kind="ppl_causal", seq_len=wp.seq_len, stride=wp.stride,
                        preview_n=wp.preview_n, final_n=wp.final_n, seed=wp.seed,
                        strict=wp.strict, tokenizer_hash=tokenizer.tokenizer_hash(tok))
    t = time.perf_counter()
    loaded = loading.load_model(src, device="cpu")
    load_s = time.perf_counter() - t
    n, length = plan.final.input_ids.shape
    batch = evaluate.auto_batch_size(loaded.model, n, length, "cpu")
    t = time.perf_counter()
    with torch.inference_mode():
        for windows in (plan.preview, plan.final):
            for lo in range(0, windows.n, batch):
                ids = torch.from_numpy(windows.input_ids[lo:lo + batch])
                mask = torch.from_numpy(windows.attention_mask[lo:lo + batch])
                del loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    print(json.dumps({"load_s": load_s, "forward_s": time.perf_counter() - t, "batch": batch,
                      "windows": plan.preview.n + plan.final.n}))


def certify(tmp: Path, model: Path, name: str, plan: str, seq_len: int, dataset: str,
            extra: str, *, underpowered: bool = False, blocks: bool = False) -> dict:
    edit = tmp / f"{name}.edit.yaml"
    edit.write_text(f"edit: {{name: quant_rtn, plan: {plan}}}\n")
    preset = tmp / f"{name}.preset.yaml"
    preset.write_text(_preset(seq_len, extra, underpowered=underpowered))
    out, cache = tmp / name, tmp / f"{name}.cache"
    load = os.getloadavg()[0]
    child = run_child([sys.executable, *certify_command(blocks=blocks), "certify",
                       "--baseline", str(model), "--dataset", dataset, "--profile", "ci",
                       "--edit", "quant_rtn", "--edit-config", str(edit), "--preset",
                       str(preset), "--cache-dir", str(cache), "--out", str(out), "--json", "-q"],
                      cwd=HERE.parents[1], env={**os.environ, "PYTHONPATH": str(HERE.parents[1])})
    if child.code not in (0, 1):
        raise SystemExit(f"{name} exited {child.code}: {child.stderr.strip()[-600:]}")
    cert = json.loads((out / "evaluation.cert.json").read_text(encoding="utf-8"))
    entry = json.loads(next(cache.rglob("*.json")).read_text(encoding="utf-8"))
    sets = entry["payload"]["sets"]
    win = cert["windows"]
    return {"verdict": cert["verdict"]["status"], "cert": cert,
            "baseline": (len(sets["preview"]["values"]), len(sets["final"]["values"])),
            "subject": (len(win["preview"]["subject"]), len(win["final"]["subject"])),
            "planned": len(win["preview"]["ids"]) + len(win["final"]["ids"]),
            "wall": child.wall, "peak": child.peak, "load": load,
            "decided": (cert.get("sequential") or {}).get("reason", "fixed design"),
            "blocks": cert["baseline"].get("final_blocks")}


def borderline_limit(cert: dict) -> float:
    """A limit at the subject's own ratio on its final windows (rounded up, above 1)."""
    final = cert["windows"]["final"]
    n = len(final["subject"])
    delta = sum(s - b for s, b in zip(final["subject"], final["baseline"][:n], strict=True))
    ratio = math.exp(delta / sum(final["tokens"][:n]))
    return max(math.ceil(ratio * 1e5) / 1e5, 1.00001)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--subjects", nargs="+", default=["int8", "rtn2", "borderline"],
                        choices=["int8", "rtn2", "borderline"],
                        help="which runs (borderline needs int8: its limit is int8's ratio)")
    parser.add_argument("--dataset", default="demo",
                        help="corpus, as certify's --dataset takes it (default: demo)")
    parser.add_argument("--floor", type=float, metavar="SECONDS",
                        help="the floor an earlier invocation measured on the same windows "
                             "(skips measuring it: at 512 tokens on 2 cores it takes an hour)")
    parser.add_argument("--blocks", action="store_true",
                        help="one model resident at a time (the blocks schedule)")
    parser.add_argument("--child-floor", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_floor:
        child_floor(*args.child_floor)
        return 0
    if args.model is None:
        parser.error("--model is required")
    model = args.model.resolve()
    dataset = args.dataset if args.dataset in ("demo", "wikitext2") or \
        args.dataset.startswith("hf:") else str(Path(args.dataset).resolve())
    print(f"SmolLM2-135M, ci profile, windows of {args.seq_len} tokens ({args.dataset}), "
          f"{'blocks: one model resident at a time' if args.blocks else 'schedule by memory'}")
    if args.floor is not None:
        floor = args.floor
        print(f"fixed-design forward floor: {floor:.1f} s (given)", flush=True)
    else:
        load = os.getloadavg()[0]
        floor_run = run_child([sys.executable, str(HERE), "--child-floor", str(model),
                               str(args.seq_len), dataset], cwd=HERE.parents[1],
                              env={**os.environ, "PYTHONPATH": str(HERE.parents[1])})
        if floor_run.code:
            raise SystemExit(f"floor failed: {floor_run.stderr.strip()[-600:]}")
        f = json.loads(floor_run.stdout.strip().splitlines()[-1])
        floor = 2 * (f["load_s"] + f["forward_s"])
        print(f"fixed-design forward floor: 2 x (load {f['load_s']:.1f} s + {f['windows']} "
              f"forwards {f['forward_s']:.1f} s, batch {f['batch']}) = {floor:.1f} s; process "
              f"peak RSS {floor_run.peak / MIB:,.0f} MiB (load {load:.1f})", flush=True)
    print(f"{'subject':<11} {'verdict':<7} {'baseline':>9} {'subject':>9} {'forwards':>9} "
          f"{'wall s':>7} {'x floor':>7} {'peak MiB':>9} {'load':>5}  decision", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        runs: dict[str, dict] = {}
        for name in ("int8", "rtn2", "borderline"):
            if name not in args.subjects or (name == "borderline" and "int8" not in runs):
                continue
            if name == "int8":
                runs[name] = certify(tmp, model, name, PLANS["int8"], args.seq_len, dataset, "",
                                     blocks=args.blocks)
            elif name == "rtn2":
                runs[name] = certify(tmp, model, name, PLANS["rtn2"], args.seq_len, dataset,
                                     "eval: {primary_metric: {catastrophic_ratio: 1000.0}}\n",
                                     underpowered=True,  # above ci's catastrophe limit
                                     blocks=args.blocks)
            else:
                limit = borderline_limit(runs["int8"]["cert"])
                runs[name] = certify(tmp, model, name, PLANS["int8"], args.seq_len, dataset,
                                     f"eval: {{primary_metric: {{ratio_limit: {limit}}}}}\n",
                                     blocks=args.blocks)
                print(f"borderline: INT8 against ratio_limit {limit} (its own ratio on its "
                      "final windows)", flush=True)
            r = runs[name]
            b, s = r["baseline"], r["subject"]
            print(f"{name:<11} {r['verdict']:<7} {b[0]:>4}+{b[1]:<4} {s[0]:>4}+{s[1]:<4} "
                  f"{sum(b) + sum(s):>4}/{2 * r['planned']:<4} {r['wall']:7.1f} "
                  f"{r['wall'] / floor:7.2f} {r['peak'] / MIB:9,.0f} {r['load']:5.1f}  "
                  f"{r['decided']}; baseline final blocks {r['blocks']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
