"""AcmeLM checkpoints: GPT-2 weights under an architecture name transformers does not know."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from invarlock.enums import AdapterKind
from invarlock.plugins import AdapterPlugin

LOADS: list[str] = []  # paths this loader opened (lets tests see it was used)


def load(path: Path, *, dtype: Any, device: str) -> Any:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    LOADS.append(str(path))
    return model.to(device).eval()


ADAPTER = AdapterPlugin(name="acme_causal", kind=AdapterKind.CAUSAL_LM,
                        architectures=("AcmeLM",), summary="AcmeLM checkpoints (GPT-2 weights)",
                        load=load)
