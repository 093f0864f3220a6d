"""Network allowed but the Hub unreachable: one line within seconds, not half a minute of
retries."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from invarlock import network
from tests.faults.conftest import error_lines, invoke


@pytest.fixture
def silent_endpoint():
    """A TCP port that accepts connections and never answers (a black hole)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def closed_endpoint():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def answering_endpoint():
    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_probe_tells_an_answering_hub_from_a_dead_one(answering_endpoint, closed_endpoint,
                                                      silent_endpoint, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", answering_endpoint)
    assert network.hub_unreachable(timeout=2) is None  # any HTTP answer is an answer
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint)
    assert network.hub_unreachable(timeout=2)
    monkeypatch.setenv("HF_ENDPOINT", silent_endpoint)
    started = time.monotonic()
    assert "no answer" in network.hub_unreachable(timeout=0.5)
    assert time.monotonic() - started < 3


def test_hf_dataset_with_an_unreachable_hub_fails_fast_in_one_line(
        silent_endpoint, tiny_gpt2_dir, fast_preset, tmp_path, monkeypatch):
    monkeypatch.setenv("INVARLOCK_ALLOW_NETWORK", "1")
    monkeypatch.setenv("HF_ENDPOINT", silent_endpoint)
    monkeypatch.setattr(network, "PROBE_TIMEOUT_S", 1.0)
    started = time.monotonic()
    code, payload, stderr = invoke(
        "certify", "--baseline", str(tiny_gpt2_dir), "--subject", str(tiny_gpt2_dir),
        "--dataset", "hf:invarlock-tests/never-cached", "--profile", "dev",
        "--preset", str(fast_preset), "--out", str(tmp_path / "o"), "--no-cache", "--json")
    assert time.monotonic() - started < 10
    assert code == 3
    assert "unreachable" in payload["error"] and "never-cached" in payload["error"]
    assert len(error_lines(stderr)) == 1
    assert "retry" not in stderr.lower()
