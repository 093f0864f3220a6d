"""Calibration of the whole-model limits: the rows guard's τ and spectral's edit-size limit.

Benign edits are applied to each reference model and measured by the product's own probes
(`RowsProbe`, `SpectralProbe`), baseline streamed from its files as in a certification:

- the zoo's benign families (`invarlock.calibration.zoo.BENIGN`: 8-bit RTN, 4-bit RTN per
  group of 128, half-precision round trips, quantization noise, light pruning, norm folds, a
  small LoRA merge, SmoothAttention-style q/k and AWQ-style value/up rescalings, together
  and apart, AWQ scaling then 4-bit RTN; not the 50% pruning families,
  `zoo_run.UNCALIBRATED`, nor GPTQ, `PENDING`); a family that does not apply to a model is
  skipped;
- 4-bit group-wise RTN (groups of 128 inputs) of every block matrix, as `quant_rtn` does;
- edits real tools make outside the blocks: 8-bit per-row and 4-bit group-wise (32, the
  GGUF block) RTN of every embedding and head row, and an fp16 or bf16 round trip of every
  tensor (norms and biases included).

Each run records its largest relative row change and its largest edit size ‖ΔW‖₂/σ_b. The
limits are `MARGIN` times the largest benign value over every run, rounded up to two
significant digits (`derive`). The raw runs are committed (`policies/calibration/wholemodel.csv`)
and `tests/test_calibrate_wholemodel.py` recomputes the limits from them and re-measures the
demo model's runs.

    python -m invarlock.calibration.wholemodel OUT.csv MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

MARGIN = 2.0
SEEDS = (0, 1, 2)
# GPTQ's error feedback moves weights further than RTN (edit size: tiny GPT-2 0.38, demo
# 0.22): in the null it would raise the edit-size limit to 0.77, under which a permutation of
# the demo's MLP rows passes spectral. It stays out until the edit size is measured in a form
# that GPTQ leaves small (CALIBRATION.md, "The whole model").
PENDING = ("gptq4",)
COLUMNS = ("model", "edit", "seed", "max_row_change", "row_tensor", "max_edit_size",
           "edit_module")


def round_up(x: float, digits: int = 2) -> float:
    """x rounded up to `digits` significant digits (a limit never ends below its input)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(round(x * scale, 9)) / scale


def derive(runs: Sequence[Mapping[str, Any]], margin: float = MARGIN) -> dict[str, float]:
    """{"tau": ..., "edit_size_limit": ...}: margin × the largest benign value, rounded up."""
    if not runs:
        raise ValueError("no calibration runs")
    rows = max(float(r["max_row_change"]) for r in runs)
    edits = max(float(r["max_edit_size"]) for r in runs)
    return {"tau": round_up(margin * rows), "edit_size_limit": round_up(margin * edits)}


def read_runs(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_runs(path: Path, runs: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in runs:
            writer.writerow({k: r[k] for k in COLUMNS})


# --- measurement (torch) -------------------------------------------------------------------


def benign_edits() -> dict[str, Callable[[Any, int], None]]:
    """{name: edit(model, seed)}: the zoo's benign families and the whole-model edits."""
    import torch

    from invarlock.calibration import zoo
    from invarlock.families import family_of

    def outside_blocks(model: Any) -> list[torch.Tensor]:
        seen, out = set(), []
        for name, p in model.named_parameters():
            if p.dim() == 2 and str(family_of(name)) in ("embed", "other") and \
                    p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                out.append(p)
        return out

    def rows_rtn(bits: int, group: int | None) -> Callable[[Any, int], None]:
        def edit(model: Any, seed: int) -> None:
            for p in outside_blocks(model):
                p.copy_(zoo.rtn(p.float(), bits, group).to(p.dtype))
        return edit

    def blocks_rtn4_g128(model: Any, seed: int) -> None:
        for b in zoo.block_matrices(model):
            b.rows().copy_(zoo.rtn(b.rows().float(), 4, 128).to(b.rows().dtype))

    def round_trip(dtype: torch.dtype) -> Callable[[Any, int], None]:
        def edit(model: Any, seed: int) -> None:
            for p in model.parameters():
                if p.dtype.is_floating_point:
                    p.copy_(p.to(dtype).to(p.dtype))
        return edit

    from invarlock.calibration.zoo_run import UNCALIBRATED

    edits: dict[str, Callable[[Any, int], Any]] = {
        k: v for k, v in zoo.BENIGN.items() if k not in UNCALIBRATED + PENDING}
    edits.update({"blocks_rtn4_g128": blocks_rtn4_g128, "rows_rtn8": rows_rtn(8, None),
                  "rows_rtn4_g32": rows_rtn(4, 32), "all_fp16": round_trip(torch.float16),
                  "all_bf16": round_trip(torch.bfloat16)})
    return edits


def measure_edit(model_dir: Path, edit: Callable[[Any, int], None], seed: int) -> dict[str, Any]:
    """Largest row change and edit size of one benign edit of the model in `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.rows import RowsProbe
    from invarlock.guards.measure.spectral import SpectralProbe
    from invarlock.models.source import weight_files

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    probes = [RowsProbe({"tau": 1.0}), SpectralProbe({})]
    for probe in probes:
        probe.baseline_loaded(model)
    states = [probe.baseline_state() for probe in probes]
    with torch.no_grad():
        edit(model, seed)
    ctx = SubjectContext(info=None, model=model, config=model.config.to_dict(),
                         baseline_config={}, baseline_files=weight_files(model_dir),
                         tokenizer_hashes=("", ""), base_model_prefix=model.base_model_prefix)
    measured = []
    for probe, state in zip(probes, states, strict=True):
        probe.subject_loaded(ctx, state)
        measured.append(probe.measure(ctx, state))
    rows = max(measured[0]["tensors"], key=lambda t: _num(t["max_change"]))
    sizes = max(measured[1]["modules"], key=lambda m: _num(m["edit_size"]))
    return {"max_row_change": _num(rows["max_change"]), "row_tensor": rows["name"],
            "max_edit_size": _num(sizes["edit_size"]), "edit_module": sizes["name"]}


def _num(x: Any) -> float:
    return math.inf if x is None else float(x)


def measure_models(models: Mapping[str, Path], seeds: Sequence[int] = SEEDS
                   ) -> list[dict[str, Any]]:
    from invarlock.calibration import zoo

    runs = []
    for label, path in models.items():
        for name, edit in benign_edits().items():
            for seed in seeds:
                try:
                    measured = measure_edit(path, edit, seed)
                except zoo.NotApplicable:  # e.g. up/down pairs in GPT-2's ungated MLP
                    break
                runs.append({"model": label, "edit": name, "seed": seed, **measured})
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m invarlock.calibration.wholemodel OUT.csv "
                         "LABEL=MODEL_DIR [LABEL=MODEL_DIR ...]")
    models = dict(a.split("=", 1) for a in args[1:])
    runs = measure_models({k: Path(v) for k, v in models.items()})
    write_runs(Path(args[0]), runs)
    print(derive(runs))


if __name__ == "__main__":
    main()
