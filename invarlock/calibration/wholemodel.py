"""Calibration of the whole-model limits: the rows guard's τ and spectral's limit on the edit
size along the data.

Benign edits are applied to each reference model and measured by the product's own probes
(`RowsProbe`, `SpectralProbe`), baseline streamed from its files as in a certification:

- the zoo's benign families (`invarlock.calibration.zoo.BENIGN`: 8-bit RTN, 4-bit RTN per
  group of 128, half-precision round trips, quantization noise, light pruning, norm folds, a
  small LoRA merge, SmoothAttention-style q/k and AWQ-style value/up rescalings, together
  and apart, AWQ scaling then 4-bit RTN, GPTQ-style 4-bit; not the 50% pruning families,
  `zoo_run.UNCALIBRATED`); a family that does not apply to a model is skipped;
- 4-bit group-wise RTN (groups of 128 inputs) of every block matrix, as `quant_rtn` does;
- edits real tools make outside the blocks: 8-bit per-row and 4-bit group-wise (32, the
  GGUF block) RTN of every embedding and head row, and an fp16 or bf16 round trip of every
  tensor (norms and biases included).

Each run records its largest relative row change, its largest edit size ‖ΔW‖₂/σ_b and its
largest edit size along the data ‖ΔW·X‖_F/‖W_b·X‖_F (`invarlock.guards.measure.sketch`; X:
the model's calibration text, `calibration_windows`). The limits are `MARGIN` times the
largest benign value over every run, rounded up to two significant digits (`derive`). The
raw runs are committed (`policies/calibration/wholemodel.csv`) and
`tests/test_calibrate_wholemodel.py` recomputes the limits from them and re-measures the
demo model's runs.

    python -m invarlock.calibration.wholemodel OUT.csv LABEL=MODEL_DIR:TEXT [...]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

MARGIN = 2.0
SEEDS = (0, 1, 2)
# Benign families left out of the null: none. GPTQ's error feedback moves weights along the
# inputs the data barely drives, so its edit size in weight space is the largest of any
# benign edit (tiny GPT-2 0.38; SmolLM2-135M 1.9 on the module that carries its massive
# activations, where a permutation of rows is 1.4): no weight-space limit separates it from
# damage. Along the data it is as small as RTN's, and that is the size that is gated.
PENDING: tuple[str, ...] = ()
COLUMNS = ("model", "edit", "seed", "max_row_change", "row_tensor", "max_edit_size",
           "edit_module", "max_edit_along_data", "data_module")


def round_up(x: float, digits: int = 2) -> float:
    """x rounded up to `digits` significant digits (a limit never ends below its input)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(round(x * scale, 9)) / scale


def derive(runs: Sequence[Mapping[str, Any]], margin: float = MARGIN) -> dict[str, float]:
    """{"tau", "edit_along_data_limit"}: margin × the largest benign value of each, rounded
    up. The edit size in weight space is recorded, not made a limit: GPTQ's error feedback
    makes it as large as a rearrangement of rows (`PENDING`'s note)."""
    if not runs:
        raise ValueError("no calibration runs")
    rows = max(float(r["max_row_change"]) for r in runs)
    along = max(float(r["max_edit_along_data"]) for r in runs)
    return {"tau": round_up(margin * rows), "edit_along_data_limit": round_up(margin * along)}


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


CALIBRATION_WINDOWS = 16  # windows of the text the input sketches are taken on
WINDOW_TOKENS = 128


def calibration_windows(model_dir: Path, text: Path) -> Any:
    """The first `CALIBRATION_WINDOWS` windows of `WINDOW_TOKENS` tokens of `text` (a .txt
    or .txt.gz file), cut from the stream the model's own tokenizer makes of it."""
    import gzip

    import numpy as np
    from transformers import AutoTokenizer

    from invarlock.data.windows import WindowSet, cut_windows, window_sha256

    opener = gzip.open if text.suffix == ".gz" else open
    with opener(text, "rt", encoding="utf-8") as fh:
        raw = fh.read()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    budget = CALIBRATION_WINDOWS * WINDOW_TOKENS * 8  # characters: plenty of tokens
    stream = np.asarray(tokenizer(raw[:budget])["input_ids"], dtype=np.int64)
    ids = cut_windows(stream, WINDOW_TOKENS, WINDOW_TOKENS)[:CALIBRATION_WINDOWS]
    if ids.shape[0] < CALIBRATION_WINDOWS:
        raise ValueError(f"{text}: fewer than {CALIBRATION_WINDOWS} windows of "
                         f"{WINDOW_TOKENS} tokens")
    return WindowSet(name="final", window_ids=np.arange(ids.shape[0], dtype=np.int64),
                     input_ids=ids, attention_mask=np.ones_like(ids), labels=None,
                     token_type_ids=None, sha256=tuple(window_sha256(w) for w in ids))


def measure_baseline(model_dir: Path, text: Path) -> list[dict[str, Any]]:
    """The rows and spectral probes' baseline states, the input sketches taken on the
    calibration windows of `text` as in a certification."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.enums import MetricKind
    from invarlock.evaluate import evaluate_windows
    from invarlock.guards.measure.probe import RunInfo
    from invarlock.guards.measure.rows import RowsProbe
    from invarlock.guards.measure.spectral import SpectralProbe

    windows = calibration_windows(model_dir, text)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    info = RunInfo(kind=MetricKind.PPL_CAUSAL, device="cpu", seed=0,
                   preview_ids=np.zeros(0, dtype=np.int64), calibration_ids=windows.window_ids,
                   replicates=0, ci_alpha=0.05, bootstrap_seed=0)
    probes = [RowsProbe({"tau": 1.0}), SpectralProbe({})]
    taps = []
    for probe in probes:
        probe.bind(info)
        probe.baseline_loaded(model)
        taps += probe.taps(model, "baseline", "final")
    with torch.inference_mode():
        evaluate_windows(model, windows, kind=MetricKind.PPL_CAUSAL, device="cpu",
                         batch_size=8, taps=taps)
    return [probe.baseline_state() for probe in probes]


def measure_edit(model_dir: Path, text: Path, edit: Callable[[Any, int], None], seed: int,
                 baseline: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Largest row change, edit size and edit size along the data of one benign edit of the
    model in `model_dir` (`baseline`: its states from `measure_baseline`, taken when None)."""
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.rows import RowsProbe
    from invarlock.guards.measure.spectral import SpectralProbe
    from invarlock.models.source import weight_files

    states = measure_baseline(model_dir, text) if baseline is None else baseline
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        edit(model, seed)
    ctx = SubjectContext(info=None, model=model, config=model.config.to_dict(),
                         baseline_config={}, baseline_files=weight_files(model_dir),
                         tokenizer_hashes=("", ""), base_model_prefix=model.base_model_prefix)
    measured = []
    for probe, state in zip([RowsProbe({"tau": 1.0}), SpectralProbe({})], states, strict=True):
        probe.subject_loaded(ctx, state)
        measured.append(probe.measure(ctx, state))
    rows = max(measured[0]["tensors"], key=lambda t: _num(t["max_change"]))
    sizes = max(measured[1]["modules"], key=lambda m: _num(m["edit_size"]))
    along = [m for m in measured[1]["modules"] if m.get("edit_along_data") is not None]
    if not along:
        raise ValueError(f"{model_dir}: no module has an input sketch")
    data = max(along, key=lambda m: float(m["edit_along_data"]))
    return {"max_row_change": _num(rows["max_change"]), "row_tensor": rows["name"],
            "max_edit_size": _num(sizes["edit_size"]), "edit_module": sizes["name"],
            "max_edit_along_data": float(data["edit_along_data"]), "data_module": data["name"]}


def _num(x: Any) -> float:
    return math.inf if x is None else float(x)


def measure_models(models: Mapping[str, tuple[Path, Path]], seeds: Sequence[int] = SEEDS
                   ) -> list[dict[str, Any]]:
    """One row per benign edit and seed of every model; `models`: {label: (model folder,
    calibration text)}."""
    from invarlock.calibration import zoo

    runs = []
    for label, (path, text) in models.items():
        baseline = measure_baseline(path, text)
        for name, edit in benign_edits().items():
            for seed in seeds:
                try:
                    measured = measure_edit(path, text, edit, seed, baseline)
                except zoo.NotApplicable:  # e.g. up/down pairs in GPT-2's ungated MLP
                    break
                runs.append({"model": label, "edit": name, "seed": seed, **measured})
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m invarlock.calibration.wholemodel OUT.csv "
                         "LABEL=MODEL_DIR:TEXT [LABEL=MODEL_DIR:TEXT ...]")
    models = {}
    for arg in args[1:]:
        label, _, rest = arg.partition("=")
        folder, _, text = rest.partition(":")
        models[label] = (Path(folder), Path(text))
    runs = measure_models(models)
    write_runs(Path(args[0]), runs)
    print(derive(runs))


if __name__ == "__main__":
    main()
