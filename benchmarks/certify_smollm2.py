"""Benchmark: `invarlock certify` against the forward-pass floor, measured in one run.

On SmolLM2-135M (dev profile: 64 + 64 windows of 128 tokens of the bundled demo corpus) and
two subject checkpoints made from it (INT8 round-to-nearest per channel, and INT8 in groups
of 64 inputs), one invocation runs, each as its own process:

1. the floor: load the baseline, run its bare forward passes (logits only) over the preview
   and final windows, drop it, load the first subject, run the same passes -- at the batch
   size certify picks for these windows;
2. `invarlock certify` of the first subject (fresh baseline cache: the baseline is evaluated);
3. `invarlock certify` of the second subject against the cached baseline;
4. with --guards-off, step 2 again with every guard off and a fresh cache;
5. with --blocks, step 2 again one model resident at a time (the blocks schedule, as when a
   second model does not fit: no memory is reported free for it) and a fresh cache.

It prints certify / floor, second subject / first run, the guards' share of the wall time
(their own stages from the certificate's timings, and the whole difference against the run
with every guard off), evaluation tokens/s, each process's peak RSS and the RSS budget
(1.6 x one model's bytes + 0.5 GB with one model resident, one model's bytes more in the
lockstep schedule, which keeps the baseline beside the subject when both fit; the largest
peak of each schedule over the rounds). The machine's load
average is printed beside each step: on a shared machine, compare ratios, not seconds. With
--rounds N the steps repeat N times, interleaved, and the ratios are given per round and as
medians.

    python benchmarks/certify_smollm2.py --model .cache/models/smollm2-135m
    python benchmarks/certify_smollm2.py --model ... --code /path/to/other/checkout
(`make bench` prepares the model and runs this.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import certify_command, run_child

HERE = Path(__file__).resolve()
GB = 1e9
MIB = 2**20
SUBJECTS = {"int8": {"bitwidth": 8, "per_channel": True, "scope": "all"},
            "int8-g64": {"bitwidth": 8, "per_channel": True, "group_size": 64, "scope": "all"}}


# --- child processes (run with cwd and PYTHONPATH = the code under test) ---------------------


def _request(model: str, subject: str) -> object:
    from invarlock.run_config import config_from_certify_flags, request_from_config

    config = config_from_certify_flags({"baseline": model, "subject": subject,
                                        "dataset_spec": "demo", "profile": "dev"})
    return request_from_config(config)


def child_make_subject(model: str, out: str, plan: str) -> None:
    """Write a quant_rtn-edited copy of the baseline as a subject checkpoint."""
    from invarlock.edits import get_edit
    from invarlock.models import loading, source

    edit = get_edit("quant_rtn")
    loaded = loading.load_model(source.resolve_model_source(model), device="cpu")
    edit.apply(loaded.model, edit.parse_plan({"name": "quant_rtn", "plan": json.loads(plan)}))
    loaded.weights_digest = loading.tensor_digest(loaded.model)
    loading.save_checkpoint(loaded, out)


def child_floor(model: str, subject: str) -> None:
    """Load each model and run its bare forward passes over the certify run's windows."""
    import torch

    from invarlock import evaluate
    from invarlock.data.corpus import load_corpus
    from invarlock.data.windows import plan_windows
    from invarlock.models import loading, source, tokenizer
    from invarlock.policy import resolve

    start = time.perf_counter()
    req = _request(model, subject)
    src = source.resolve_model_source(model)
    policy = resolve(req.config, context_length=source.context_length(source.read_config(src)))
    tok = loading.load_tokenizer(src)
    wp = policy.windows
    plan = plan_windows(load_corpus(req.dataset, labelled=False), tok, kind="ppl_causal",
                        seq_len=wp.seq_len, stride=wp.stride, preview_n=wp.preview_n,
                        final_n=wp.final_n, seed=wp.seed, strict=wp.strict,
                        tokenizer_hash=tokenizer.tokenizer_hash(tok))
    forward_s, batch = 0.0, None
    for path in (model, subject):
        loaded = loading.load_model(source.resolve_model_source(path), device="cpu")
        batch = batch or _certify_batch_size(evaluate, loaded.model, plan)
        t = time.perf_counter()
        with torch.inference_mode():
            for windows in (plan.preview, plan.final):
                for lo in range(0, windows.n, batch):
                    ids = torch.from_numpy(windows.input_ids[lo:lo + batch])
                    mask = torch.from_numpy(windows.attention_mask[lo:lo + batch])
                    logits = loaded.model(input_ids=ids, attention_mask=mask,
                                          use_cache=False).logits
                    del logits
        forward_s += time.perf_counter() - t
        del loaded
    tokens = 2 * (plan.preview.input_ids.size + plan.final.input_ids.size)
    print(json.dumps({"batch": batch, "forward_s": forward_s, "tokens": tokens,
                      "in_process_s": time.perf_counter() - start}))


def _certify_batch_size(evaluate: object, model: object, plan: object) -> int:
    """The batch size evaluate_windows picks for these windows in the code under test."""
    n, seq_len = plan.final.input_ids.shape
    kwargs = {}
    chunkable = getattr(evaluate, "_chunkable_head", None)
    if chunkable is not None:  # chunked scoring: the batch is not bounded by the logits
        import torch

        with torch.inference_mode():
            kwargs["full_logits"] = chunkable(model, plan.final, "ppl_causal", "cpu") is None
    return evaluate.auto_batch_size(model, n, seq_len, "cpu", **kwargs)


# --- driver ----------------------------------------------------------------------------------


def _spawn(args: list[str], code: Path) -> tuple[float, float, str]:
    """Run a child; returns (wall seconds, peak RSS bytes, stdout)."""
    child = run_child([sys.executable, *args], cwd=code,
                      env={**os.environ, "PYTHONPATH": str(code)})
    if child.code not in (0, 1):
        sys.exit(f"{' '.join(args[:3])} failed ({child.code}):\n{child.stderr[-3000:]}")
    return child.wall, child.peak, child.stdout


def certify(code: Path, model: Path, subject: Path, out: Path, cache: Path,
            extra: list[str], *, blocks: bool = False) -> dict:
    wall, peak, stdout = _spawn(
        [*certify_command(blocks=blocks), "certify", "--baseline", str(model),
         "--subject", str(subject), "--dataset", "demo", "--profile", "dev", "--out", str(out),
         "--cache-dir", str(cache), "--json", "--quiet", *extra], code)
    summary = json.loads(stdout)
    cert = json.loads(Path(summary["certificate"]).read_text())
    return {"wall": wall, "peak": peak, "summary": summary, "cert": cert,
            "load": os.getloadavg()[0]}


def floor(code: Path, model: Path, subject: Path) -> dict:
    wall, peak, stdout = _spawn([str(HERE), "--child-floor", str(model), str(subject)], code)
    return {"wall": wall, "peak": peak, **json.loads(stdout.strip().splitlines()[-1]),
            "load": os.getloadavg()[0]}


def eval_tokens(cert: dict) -> tuple[int, float]:
    """(tokens scored, seconds in evaluation passes) of one certify run."""
    timings = cert["timings"]
    seconds = sum(v for k, v in timings.items() if k.endswith("_eval_s"))
    tokens = 0
    for name in ("preview", "final"):
        per_window = sum(cert["windows"][name]["tokens"])
        models = (0 if cert["baseline"]["results_from_cache"] else 1) + (
            1 if cert["windows"][name]["subject"] else 0)
        tokens += per_window * models
    return tokens, seconds


def guard_seconds(cert: dict) -> float:
    return sum(v for k, v in cert["timings"].items() if k.startswith("guard_"))


def show_certify(label: str, r: dict) -> None:
    cert, s = r["cert"], r["summary"]
    tokens, seconds = eval_tokens(cert)
    total = cert["timings"]["total_s"]
    print(f"{label}:")
    print(f"  verdict             {s['verdict']} (ratio {s['ratio']:.4f}, CI {s['ratio_ci']})")
    print(f"  wall time           {r['wall']:.1f} s (in-process {total:.1f} s; "
          f"load {r['load']:.1f})")
    print(f"  baseline from cache {cert['baseline']['results_from_cache']}, schedule "
          f"{cert['baseline'].get('schedule')}")
    if seconds:
        print(f"  evaluation          {tokens / seconds:,.0f} tokens/s ({tokens:,} tokens)")
    g = guard_seconds(cert)
    print(f"  guards' own stages  {g:.1f} s = {100 * g / r['wall']:.1f}% of the wall time")
    print(f"  peak RSS            {r['peak'] / MIB:,.0f} MiB")
    print("  stages              " + ", ".join(f"{k} {v:.1f}" for k, v in cert["timings"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--code", type=Path, default=HERE.parents[1],
                        help="the invarlock checkout to measure (default: this one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (OMP_NUM_THREADS) for the child processes")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--guards-off", action="store_true",
                        help="also time a first run with every guard off")
    parser.add_argument("--blocks", action="store_true",
                        help="also time a first run one model resident at a time")
    parser.add_argument("--child-floor", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-subject", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_floor:
        return child_floor(*args.child_floor)
    if args.child_subject:
        return child_make_subject(*args.child_subject)
    if args.model is None:
        parser.error("--model is required")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model, code = args.model.resolve(), args.code.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        subjects = {}
        for name, plan in SUBJECTS.items():
            subjects[name] = tmp_path / name
            _spawn([str(HERE), "--child-subject", str(model), str(subjects[name]),
                    json.dumps(plan)], code)
        preset = tmp_path / "guards-off.yaml"
        _, _, names = _spawn(["-c", "from invarlock.guards.registry import guard_names; "
                                    "print(*guard_names())"], code)  # the code under test's
        preset.write_text("guards:\n" + "".join(f"  {name}: {{mode: \"off\"}}\n"
                                                for name in names.split()))
        rounds = []
        for i in range(args.rounds):
            cache = tmp_path / f"cache{i}"
            f = floor(code, model, subjects["int8"])
            first = certify(code, model, subjects["int8"], tmp_path / f"a{i}", cache, [])
            second = certify(code, model, subjects["int8-g64"], tmp_path / f"b{i}", cache, [])
            bare = certify(code, model, subjects["int8"], tmp_path / f"off{i}",
                           tmp_path / f"c-off{i}", ["--preset", str(preset)]
                           ) if args.guards_off else None
            alone = certify(code, model, subjects["int8"], tmp_path / f"blocks{i}",
                            tmp_path / f"c-blocks{i}", [], blocks=True) if args.blocks else None
            rounds.append((f, first, second, bare, alone))
    report(code, rounds)


def installed_backends() -> list[str]:
    """Optional quantization backends installed beside the code under test.

    transformers imports some of them whenever it loads a model or a tokenizer (hqq brings
    torch.compile's whole stack with it, about 200 MiB of RSS), so they belong with the figures.
    """
    from importlib import metadata

    names = ("torchao", "bitsandbytes", "hqq", "optimum-quanto", "compressed-tensors",
             "gptqmodel", "fbgemm-gpu", "gguf")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def report(code: Path, rounds: list) -> None:
    f, first, second, bare, alone = rounds[-1]
    params = first["cert"]["baseline"]["parameters"]
    model_bytes = params * 4  # float32 on CPU
    budget = 1.6 * model_bytes + 0.5 * GB
    print(f"SmolLM2-135M ({params:,} parameters, {model_bytes / GB:.2f} GB in float32), "
          f"dev profile, code {code}, {os.cpu_count()} CPUs visible")
    print("optional backends installed: " + (", ".join(installed_backends()) or "none"))
    print("floor (load both models, bare forward passes, logits only):")
    print(f"  wall time           {f['wall']:.1f} s (forward passes {f['forward_s']:.1f} s, "
          f"batch {f['batch']}; load {f['load']:.1f})")
    print(f"  forward             {f['tokens'] / f['forward_s']:,.0f} tokens/s")
    print(f"  peak RSS            {f['peak'] / MIB:,.0f} MiB")
    show_certify("certify, first subject (baseline evaluated)", first)
    show_certify("certify, second subject (baseline cached)", second)
    if bare is not None:
        show_certify("certify, first subject, every guard off", bare)
    if alone is not None:
        show_certify("certify, first subject, one model at a time (blocks)", alone)
    print("ratios (targets: certify/floor <= 1.15, second/first <= 0.55, guards <= 15%, "
          "peak RSS <= budget):")
    per_round = [{"certify / floor": c["wall"] / fl["wall"],
                  "second / first": s["wall"] / c["wall"],
                  "guards' own stages": guard_seconds(c["cert"]) / c["wall"],
                  **({"guards, everything": 1 - b["wall"] / c["wall"]} if b else {})}
                 for fl, c, s, b, _ in rounds]
    percent = ("guards' own stages", "guards, everything")

    def line(values: dict) -> str:
        return ", ".join(f"{k} {100 * v:.1f}%" if k in percent else f"{k} {v:.3f}"
                         for k, v in values.items())

    for i, values in enumerate(per_round):
        print(f"  round {i + 1}: {line(values)}")
    if len(rounds) > 1:
        medians = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
        print(f"  median: {line(medians)}")
    if bare is not None:
        print("  (guards, everything: 1 - (first run with every guard off) / (first run), "
              "in the same round)")
    peaks: dict[str, int] = {}
    for _, *runs in rounds:
        for r in runs:
            if r is not None:
                kind = _residency(r["cert"])
                peaks[kind] = max(peaks.get(kind, 0), r["peak"])
    for kind, peak in sorted(peaks.items()):
        # lockstep holds the baseline beside the subject: one model's bytes more
        two = kind == "lockstep"
        allowed = budget + (model_bytes if two else 0)
        extra = f" + {model_bytes / GB:.2f} GB (the baseline beside)" if two else ""
        print(f"  peak RSS, {kind:<9} {peak / GB:.2f} GB; budget 1.6 x {model_bytes / GB:.2f}"
              f" GB + 0.5 GB{extra} = {allowed / GB:.2f} GB ({peak / allowed:.2f} x budget)")


def _residency(cert: dict) -> str:
    """lockstep (both models resident), blocks (one at a time), or cached (the baseline's
    results from the cache: no baseline model loaded)."""
    base = cert["baseline"]
    return "cached" if base["results_from_cache"] else base.get("schedule") or "blocks"


if __name__ == "__main__":
    main()
