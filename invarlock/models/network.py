"""The network switch: Hugging Face libraries run offline unless the user opts in.

Nothing in InvarLock reaches the network unless ``INVARLOCK_ALLOW_NETWORK=1``. The HF
libraries read their offline flags from the environment at import time, so the flags are set
here, before anything imports them, and patched into modules that were imported earlier.
"""

from __future__ import annotations

import os
import sys

NETWORK_ENV = "INVARLOCK_ALLOW_NETWORK"
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def network_allowed() -> bool:
    """True when the user opted in with INVARLOCK_ALLOW_NETWORK=1 (read at call time)."""
    return os.environ.get(NETWORK_ENV, "").strip().lower() in {"1", "true", "yes"}


def enforce_offline() -> None:
    """Force HF offline mode unless network access is allowed; idempotent."""
    if network_allowed():
        return
    for name in _OFFLINE_ENV:
        os.environ[name] = "1"
    # Libraries imported before this call cached the old flags as module constants.
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
