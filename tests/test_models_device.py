"""Device and dtype choice (accelerators simulated by patching torch's probes)."""

from __future__ import annotations

import pytest
import torch

from invarlock.errors import EvidenceError, InputError
from invarlock.models import device as device_mod
from invarlock.models.device import checkpoint_dtype, resolve_device, resolve_dtype


@pytest.fixture
def accelerators(monkeypatch):
    """Set which accelerators the machine appears to have."""

    def set_available(*, cuda: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(device_mod, "_mps_available", lambda: mps)

    return set_available


@pytest.mark.parametrize(("cuda", "mps", "expected"), [
    (0, False, "cpu"), (0, True, "mps"), (1, True, "cuda"), (2, False, "cuda"),
])
def test_auto_prefers_cuda_then_mps_then_cpu(accelerators, cuda, mps, expected):
    accelerators(cuda=cuda, mps=mps)
    assert resolve_device("auto") == expected
    assert resolve_device() == expected


def test_explicit_devices_are_validated(accelerators):
    accelerators(cuda=0, mps=False)
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(EvidenceError, match="device 'cuda' was requested but CUDA cannot start"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="'mps' was requested but Apple MPS is not available"):
        resolve_device("mps")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_cuda_index_is_checked(accelerators):
    accelerators(cuda=2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match=r"'cuda:2' does not exist; this machine has 2 CUDA"):
        resolve_device("cuda:2")
    with pytest.raises(InputError, match="does not exist"):
        resolve_device("cuda:x")


def test_checkpoint_dtype_from_config():
    assert checkpoint_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert checkpoint_dtype({"torch_dtype": "torch.float16"}) == "float16"
    assert checkpoint_dtype({}) is None


@pytest.mark.parametrize(("device", "saved", "expected"), [
    ("cpu", "bfloat16", torch.float32),
    ("cpu", "float16", torch.float32),
    ("mps", "float16", torch.float32),
    ("cuda", "float16", torch.float16),
    ("cuda:0", "bfloat16", torch.bfloat16),
    ("cuda", "float32", torch.float32),
    ("cuda", None, torch.float32),
])
def test_auto_dtype(monkeypatch, device, saved, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", device, saved) is expected


def test_auto_dtype_without_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda", "bfloat16") is torch.float32


def test_explicit_dtype():
    assert resolve_dtype("bfloat16", "cpu", "float32") is torch.bfloat16
    assert resolve_dtype("fp16", "cuda", None) is torch.float16
    assert resolve_dtype("float32", "cuda", "float16") is torch.float32
    with pytest.raises(InputError, match="unknown dtype 'int8'; use auto, float32"):
        resolve_dtype("int8", "cpu", None)


def test_cuda_that_cannot_start_is_an_evidence_error_naming_both_versions(accelerators,
                                                                          monkeypatch, tmp_path):
    """With a GPU expected, a missing or old driver stops the run (exit 3) in one line."""
    accelerators(cuda=0)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19\n")
    monkeypatch.setattr(device_mod, "_DRIVER_VERSION_FILE", version)
    with pytest.raises(EvidenceError) as caught:
        resolve_device("cuda")
    message = str(caught.value)
    assert caught.value.exit_code == 3 and "\n" not in message
    assert "built for CUDA 13.0 (NVIDIA driver 580 or newer)" in message
    assert "NVIDIA driver 535.104.05 found" in message
    version.unlink()
    with pytest.raises(EvidenceError, match="no NVIDIA driver visible"):
        resolve_device("cuda:0")
