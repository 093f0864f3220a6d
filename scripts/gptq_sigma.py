"""Where GPTQ moves a matrix: σ in weight space against σ along the data, per module.

GPTQ pushes each column's rounding error onto the columns not yet quantized, and the cheapest
place for it is an input channel the calibration text barely excites: the layer's output on
that text hardly moves, the weights there can move a lot. This script quantizes named block
matrices of a model, one at a time, on the inputs of held-out text (`zoo_run.held_out_text`,
the zoo's `--text-calibration` inputs) and prints, for GPTQ and round-to-nearest at 8 and 4
bits (groups of 128): the change of the top singular value of W (what spectral's deadband
gates) and of W·diag(rms x) (the matrix along the data), the weight-space edit size
‖ΔW‖_F/‖W‖_F, and the output error ‖X ΔWᵀ‖²/‖X Wᵀ‖² on the calibration inputs.

    python scripts/gptq_sigma.py --baseline .cache/models/smollm2-135m --dataset demo \\
        model.layers.28.mlp.down_proj model.layers.5.mlp.down_proj
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="block matrices by module name")
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--windows", type=int, default=24, help="preview and final windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-windows", type=int, default=None,
                        help="held-out windows GPTQ calibrates on (default: the zoo's "
                             "TEXT_WINDOWS)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.calibration.zoo_base import (
        TEXT_WINDOWS,
        _rng,
        block_matrices,
        input_grams,
        rtn,
    )
    from invarlock.calibration.zoo_gptq import gptq, output_error
    from invarlock.calibration.zoo_run import HELD_OUT_POOL, held_out_text
    from invarlock.run_config import config_from_certify_flags, request_from_config

    windows = args.calibration_windows or TEXT_WINDOWS
    if windows < 1:
        print("error: --calibration-windows must be at least 1", file=sys.stderr)
        sys.exit(2)
    model = AutoModelForCausalLM.from_pretrained(args.baseline).eval()
    blocks = [b for b in block_matrices(model) if b.name in set(args.modules)]
    missing = set(args.modules) - {b.name for b in blocks}
    if missing:
        print(f"error: no block matrix named {sorted(missing)[0]}", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        preset = Path(tmp) / "windows.yaml"
        preset.write_text(f"dataset: {{preview_n: {args.windows}, final_n: {args.windows}}}\n"
                          "auto: {allow_underpowered: true}\n")
        config = config_from_certify_flags({
            "baseline": args.baseline, "dataset_spec": args.dataset, "profile": "dev",
            "presets": (preset,), "edit_name": "quant_rtn"})
        text = held_out_text(request_from_config(config),
                             pool=max(HELD_OUT_POOL, windows))
    with torch.no_grad():
        ids = text.draw(_rng(args.seed, 17), min(windows, text.windows.shape[0]))
        grams = input_grams(model, blocks, ids)
    print(f"calibration: {ids.shape[0]} held-out windows, {ids.numel()} tokens")
    print("| module | method | σ change (weight space) | σ change (along the data) | "
          "edit size | output error |")
    print("|---|---|---:|---:|---:|---:|")
    for block, h in zip(blocks, grams, strict=True):
        w = block.rows().detach().float()
        rms = (torch.diagonal(h) / ids.numel()).sqrt().float()
        sigma = torch.linalg.matrix_norm(w, 2)
        along = torch.linalg.matrix_norm(w * rms, 2)
        energy = float(torch.einsum("oi,ij,oj->", w.double(), h, w.double()))
        for bits in (8, 4):
            for label, q in (("GPTQ", gptq(w, h, bits, 128)), ("RTN", rtn(w, bits, 128))):
                ws = float(torch.linalg.matrix_norm(q, 2) / sigma - 1)
                wd = float(torch.linalg.matrix_norm(q * rms, 2) / along - 1)
                size = float(torch.linalg.matrix_norm(q - w) / torch.linalg.matrix_norm(w))
                err = output_error(w, q, h) / energy
                print(f"| {block.name} | {bits}-bit {label} | {ws:+.2%} | {wd:+.2%} | "
                      f"{size:.3f} | {err:.1e} |")


if __name__ == "__main__":
    main()
