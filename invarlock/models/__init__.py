"""Models: where a checkpoint comes from, how it loads, which device, which tokenizer.

Importing this package forces Hugging Face offline mode unless INVARLOCK_ALLOW_NETWORK=1.
Names are re-exported lazily so that resolving a source or reading a config does not
import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from invarlock.network import enforce_offline, network_allowed

enforce_offline()

_EXPORTS = {
    "ModelSource": "source",
    "resolve_model_source": "source",
    "read_config": "source",
    "detect_adapter": "source",
    "weight_files": "source",
    "weights_digest": "source",
    "tokenizer_hash": "tokenizer",
    "tokenizer_differences": "tokenizer",
    "resolve_device": "device",
    "resolve_dtype": "device",
    "LoadedModel": "loading",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "tensor_digest": "loading",
    "save_checkpoint": "loading",
}

__all__ = ["enforce_offline", "network_allowed", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'invarlock.models' has no attribute {name!r}")
    return getattr(import_module(f"invarlock.models.{module}"), name)
