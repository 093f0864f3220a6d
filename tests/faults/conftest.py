"""Fault injection: broken models, hostile files and failing machinery, built small and once.

Every helper here runs the real CLI in-process; the checks are on what a user sees: the exit
code, exactly one JSON object on stdout with `--json`, one line on stderr, and what is (or is
not) left on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from invarlock.cli import main

FAST = ("dataset: {seq_len: 32, preview_n: 8, final_n: 8}\n"
        "eval: {bootstrap: {replicates: 100}}\n")


@pytest.fixture(scope="session")
def fast_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "fast.yaml"
    path.write_text(FAST)
    return path


def invoke(*args: str) -> tuple[int, dict | None, str]:
    """Run the CLI; return (exit code, the one JSON object if --json, stderr)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    payload = None
    if "--json" in args:
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        assert len(lines) == 1, f"stdout must hold exactly one JSON object: {result.stdout!r}"
        payload = json.loads(lines[0])
    assert "Traceback" not in result.stderr, result.stderr
    return result.exit_code, payload, result.stderr


def certify(baseline: Path, subject: Path | None, out: Path, dataset: Path, preset: Path,
            *extra: str) -> tuple[int, dict | None, str]:
    subject_args = ["--subject", str(subject)] if subject is not None else []
    return invoke("certify", "--baseline", str(baseline), *subject_args,
                  "--dataset", str(dataset), "--profile", "dev", "--preset", str(preset),
                  "--out", str(out), "--json", *extra)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("invarlock: error:")]


def _gpt2(out: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides: int) -> Path:
    """A tiny GPT-2 like tests.tinymodels.build_gpt2, with config fields overridden."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tinymodels import _save, _vocab_size

    fields = {"vocab_size": _vocab_size(tokenizer_dir), "n_positions": 128, "n_embd": 32,
              "n_layer": 2, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(GPT2Config(**fields)).eval(), tokenizer_dir, out)


def _with_nan(src: Path, dst: Path) -> Path:
    """A copy of `src` with one NaN in an attention weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("attn.c_attn.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def broken_subjects(tmp_path_factory, tiny_gpt2_dir, bpe_tokenizer_dir) -> dict[str, Path]:
    """Subjects that are not the baseline's kind of model, or not sound, by name."""
    from tests.tinymodels import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("broken")
    other_tok = train_bpe_tokenizer(root / "tok400", vocab_size=400)
    changed_tok = root / "tokenizer-changed"
    import shutil

    shutil.copytree(tiny_gpt2_dir, changed_tok)
    for f in other_tok.iterdir():
        (changed_tok / f.name).write_bytes(f.read_bytes())
    return {
        "other depth": _gpt2(root / "depth", bpe_tokenizer_dir, n_layer=3),
        "other width": _gpt2(root / "width", bpe_tokenizer_dir, n_embd=48),
        "bigger vocabulary": _gpt2(root / "vocab", bpe_tokenizer_dir,
                                   vocab_size=_vocab(bpe_tokenizer_dir) + 16),
        "smaller vocabulary": _gpt2(root / "vocab-small", bpe_tokenizer_dir,
                                    vocab_size=_vocab(bpe_tokenizer_dir) // 4),
        "NaN weight": _with_nan(tiny_gpt2_dir, root / "nan"),
        "tokenizer changed": changed_tok,
    }


@pytest.fixture(scope="session")
def nan_baseline(tmp_path_factory, tiny_gpt2_dir) -> Path:
    return _with_nan(tiny_gpt2_dir, tmp_path_factory.mktemp("nan-base") / "model")


def _vocab(tokenizer_dir: Path) -> int:
    from tests.tinymodels import _vocab_size

    return _vocab_size(tokenizer_dir)
