"""Benchmark: certify SmolLM2-135M against quantized copies of itself in shipped formats.

Subjects, each certified against the float checkpoint in its own process (dev profile:
64 + 64 windows of 128 tokens on the bundled demo corpus, `--windows` to change), after one
run that fills the baseline cache so every measured run pays for the subject only:

- float: the float checkpoint itself (safetensors), the reference cost;
- GGUF Q8_0 and GGUF Q4_0: the block matrices (attention and MLP) written with the `gguf`
  package, embeddings in float; transformers evaluates them dequantized;
- torchao int8 weight-only: quantized by transformers and saved with save_pretrained;
  evaluated with torchao's kernels.

Prints, per subject: verdict and ratio, wall time, subject evaluation tokens/s, guard
seconds and peak RSS of the certify process.

    python benchmarks/certify_quantized_smollm2.py --model .cache/models/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from child import run_child


def prepare_gguf(model_dir: Path, out: Path, qtype: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from invarlock.models import gguf_file

    if (out / f"model-{qtype}.gguf").is_file():
        return out / f"model-{qtype}.gguf"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]
    stored = gguf_file.round_trip_(model, names, qtype)
    out.mkdir(parents=True, exist_ok=True)
    gguf_file.write_gguf(model, tokenizer, out / f"model-{qtype}.gguf", qtype, stored)
    tokenizer.save_pretrained(out)
    return out / f"model-{qtype}.gguf"


def prepare_torchao(model_dir: Path, out: Path) -> Path:
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    if (out / "config.json").is_file():
        return out
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()),
        device_map="cpu")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


def run_once(model: Path, subject: Path, out: Path, cache: Path, preset: Path) -> dict:
    cmd = [sys.executable, "-m", "invarlock", "certify", "--baseline", str(model),
           "--subject", str(subject), "--dataset", "demo", "--profile", "dev", "--out",
           str(out), "--cache-dir", str(cache), "--preset", str(preset), "--json", "--quiet"]
    child = run_child(cmd)
    if child.code not in (0, 1):
        sys.exit(f"certify {subject} failed ({child.code}):\n{child.stderr}")
    summary = json.loads(child.stdout)
    cert = json.loads(Path(summary["certificate"]).read_text())
    return {"wall": child.wall, "peak_mib": child.peak / 2**20, "summary": summary, "cert": cert}


def subject_tokens_per_second(cert: dict) -> float | None:
    seconds = cert["timings"].get("subject_eval_s")
    tokens = sum(sum(cert["windows"][n]["tokens"]) for n in ("preview", "final")
                 if cert["windows"][n]["subject"])
    return tokens / seconds if seconds else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the quantized copies (default: a temporary one)")
    parser.add_argument("--windows", type=int, default=64,
                        help="preview and final windows each (default 64, the dev profile)")
    args = parser.parse_args()
    model = args.model.resolve()
    if not (model / "model.safetensors").is_file():
        sys.exit(f"{model} has no model.safetensors (run `make smollm2`)")
    work = args.work or Path(tempfile.mkdtemp(prefix="invarlock-bench-q-"))
    subjects = {
        "float (safetensors)": model,
        "GGUF Q8_0": prepare_gguf(model, work / "gguf-q8", "Q8_0"),
        "GGUF Q4_0": prepare_gguf(model, work / "gguf-q4", "Q4_0"),
        "torchao int8 (HF)": prepare_torchao(model, work / "torchao-int8"),
    }
    cache = work / "cache"
    preset = work / "windows.yaml"
    preset.write_text(f"dataset: {{preview_n: {args.windows}, final_n: {args.windows}}}\n")
    run_once(model, model, work / "warm", cache, preset)  # baseline results into the cache
    rows = []
    for label, subject in subjects.items():
        slug = "-".join(label.split()[:2]).lower().strip("()")
        result = run_once(model, subject, work / f"run-{slug}", cache, preset)
        cert, summary = result["cert"], result["summary"]
        fmt = cert["subject"].get("format") or {}
        guards = sum(v for k, v in cert["timings"].items() if k.startswith("guard"))
        rows.append((label, summary["verdict"], summary["ratio"], result["wall"],
                     subject_tokens_per_second(cert), guards, result["peak_mib"],
                     fmt.get("forward", "float")))
    print(f"SmolLM2-135M vs quantized copies (dev profile, {args.windows}+{args.windows} "
          f"windows of 128 tokens, demo corpus; work dir {work})")
    print(f"{'subject':<22} {'verdict':<7} {'ratio':>7} {'wall s':>7} {'subj tok/s':>10} "
          f"{'guards s':>8} {'peak RSS MiB':>12}  forward")
    for label, verdict, ratio, wall, tps, guards, peak, forward in rows:
        tps_text = f"{tps:,.0f}" if tps else "-"
        print(f"{label:<22} {verdict:<7} {ratio:>7.4f} {wall:>7.1f} {tps_text:>10} "
              f"{guards:>8.1f} {peak:>12,.0f}  {forward}")


if __name__ == "__main__":
    main()
