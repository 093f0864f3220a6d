"""Measure the benign runs behind the whole-model limits and write them to the policies.

Builds the tiny GPT-2 (tied head) and LLaMA (untied head) that the tests build (same seeds,
same tokenizer) and takes the bundled demo model; takes each model's input sketches on the
text it is tested with (the sonnets for the tiny models, the demo corpus for the demo),
applies every benign edit of `invarlock.calibration.wholemodel` over its seeds, and writes
one row per run to
policies/calibration/wholemodel.csv; prints the limits `derive` makes of them (the values
of `guards.rows.tau` and `guards.spectral.edit_size_limit` in policies/tiers.yaml).

    python scripts/calibrate_wholemodel.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from invarlock.calibration import wholemodel
    from invarlock.data.corpus import demo_corpus_path
    from tests import tinymodels
    from tests.guardkit import demo_dir

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = tinymodels.train_bpe_tokenizer(root / "bpe")
        sonnets = tinymodels.SONNETS
        models = {"tiny_gpt2": (tinymodels.build_gpt2(root / "gpt2", tokenizer), sonnets),
                  "tiny_llama": (tinymodels.build_llama(root / "llama", tokenizer), sonnets),
                  "demo": (demo_dir(), demo_corpus_path())}
        runs = wholemodel.measure_models(models)
    out = REPO / "policies" / "calibration" / "wholemodel.csv"
    wholemodel.write_runs(out, runs)
    print(f"{len(runs)} runs -> {out}")
    print(wholemodel.derive(runs))


if __name__ == "__main__":
    main()
