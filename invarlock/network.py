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


HUB_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 4.0  # connect and read; the HF libraries would retry for half a minute


def hub_endpoint() -> str:
    return os.environ.get(HUB_ENDPOINT_ENV, "").strip() or DEFAULT_HUB_ENDPOINT


def hub_unreachable(timeout: float | None = None) -> str | None:
    """Why the Hugging Face Hub cannot be reached right now, or None when it answers.

    One HEAD request with a short timeout: any HTTP answer counts as reachable. Called
    before a download so that a dead network costs seconds and one line, not the HF
    libraries' retry loop.
    """
    import requests

    limit = PROBE_TIMEOUT_S if timeout is None else timeout
    try:
        requests.head(hub_endpoint(), timeout=(limit, limit), allow_redirects=False)
    except requests.Timeout:
        return f"no answer within {limit:g} s"
    except requests.RequestException as exc:
        return _reason(exc)
    return None


def _reason(exc: Exception) -> str:
    """A few words for why a connection failed (urllib3's messages run to a paragraph)."""
    text = str(exc)
    for marker, words in (("NameResolution", "the host name does not resolve"),
                          ("Name or service not known", "the host name does not resolve"),
                          ("Connection refused", "connection refused"),
                          ("Network is unreachable", "network is unreachable"),
                          ("SSLError", "TLS handshake failed"),
                          ("ProxyError", "the proxy failed")):
        if marker in text or marker in type(exc).__name__:
            return words
    return type(exc).__name__
