#!/usr/bin/env bash
# Certify SmolLM2-135M and a GPT-2-small-size model at the ci profile on a CUDA machine, in
# float16 and bfloat16; print wall time, evaluation tokens/s and peak GPU memory per run.
#
#   benchmarks/gpu.sh [SMOLLM2_DIR]      (default: .cache/models/smollm2-135m, `make smollm2`)
#   DATASET=eval.txt benchmarks/gpu.sh   (any --dataset spec with 400+ windows of 512 tokens)
#
# Needs the hf extra installed with a CUDA build of torch (`python -m invarlock doctor` shows
# the device). Everything is local: the GPT-2-small-size model is built with random weights
# and SmolLM2's tokenizer (its cost is the architecture's, not the weights'). The bundled
# demo corpus holds 204,097 SmolLM2 tokens, a little short of ci's 200 + 200 windows of 512
# tokens, so without DATASET the runs are ci with 190 + 190 windows (printed in each row).
# Each run starts with an empty baseline cache, so both models are evaluated.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
smollm2="${1:-$root/.cache/models/smollm2-135m}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ ! -f "$smollm2/config.json" ]]; then
  echo "no SmolLM2-135M checkpoint at $smollm2 (run 'make smollm2' first)" >&2
  exit 2
fi
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
  echo "CUDA is not available to $python" >&2
  exit 3
}
"$python" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")'

"$python" "$here/gpu_certify.py" --make-gpt2-small "$work/gpt2-small" "$smollm2"

dataset="${DATASET:-demo}"
preset=()
if [[ "$dataset" == demo ]]; then
  printf 'dataset: {preview_n: 190, final_n: 190}\n' > "$work/demo-ci.yaml"
  preset=(--preset "$work/demo-ci.yaml")
fi

for model in "$smollm2" "$work/gpt2-small"; do
  for dtype in float16 bfloat16; do
    out="$work/out-$(basename "$model")-$dtype"
    (cd "$root" && "$python" "$here/gpu_certify.py" --baseline "$model" --dtype "$dtype" \
      --profile ci --dataset "$dataset" "${preset[@]}" --out "$out")
  done
done
