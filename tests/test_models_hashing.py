"""Weight digests hashed in pieces on a thread pool: the same value as the sequential
definition, whatever order the pieces finish in."""

from __future__ import annotations

import hashlib
import random
import time

import pytest
import torch

from invarlock.errors import InputError
from invarlock.models import hashing
from invarlock.models.loading import tensor_digest
from invarlock.models.source import weights_digest


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(hashing, "PIECE_BYTES", 1000)
    return 1000


def _pieces(data: bytes, size: int) -> bytes:
    return b"".join(hashlib.sha256(data[i:i + size]).digest() for i in range(0, len(data), size))


def test_weights_digest_is_sha256_over_each_files_header_and_piece_digests(tmp_path,
                                                                           small_pieces):
    rng = random.Random(0)
    contents = {"model-00002-of-00002.safetensors": rng.randbytes(2500),
                "model-00001-of-00002.safetensors": rng.randbytes(1000),
                "model.safetensors.index.json": b""}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    expected = hashlib.sha256()
    for name in sorted(contents):
        data = contents[name]
        expected.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        expected.update(_pieces(data, small_pieces))  # 3 pieces, 1 piece, none
    files = [tmp_path / name for name in contents]
    assert weights_digest(files) == f"sha256:{expected.hexdigest()}"


def test_a_change_in_any_piece_changes_the_file_digest(tmp_path, small_pieces):
    path = tmp_path / "model.safetensors"
    data = bytearray(random.Random(1).randbytes(3 * small_pieces + 7))
    path.write_bytes(bytes(data))
    first = weights_digest([path])
    for offset in (0, small_pieces, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 1
        path.write_bytes(bytes(changed))
        assert weights_digest([path]) != first


def test_a_file_shorter_than_its_size_is_reported_not_hashed(tmp_path, small_pieces):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 1500)
    parts = [b"header", *hashing.file_pieces(path, 2500)]  # the size stat said before
    with pytest.raises(InputError, match="changed while it was being read"):
        hashing.tree_sha256(parts)


def test_pieces_are_combined_in_order_whatever_order_they_finish_in(monkeypatch):
    monkeypatch.setattr(hashing, "hash_workers", lambda: 4)
    rng = random.Random(2)
    items = [rng.randbytes(50) for _ in range(40)]
    delays = [rng.uniform(0, 0.01) for _ in items]

    def piece(data: bytes, delay: float):
        def job() -> bytes:
            time.sleep(delay)
            return hashlib.sha256(data).digest()
        return job

    parts = [b"head", *(piece(d, s) for d, s in zip(items, delays, strict=True)), b"tail"]
    expected = hashlib.sha256(b"head" + b"".join(hashlib.sha256(d).digest() for d in items)
                              + b"tail").hexdigest()
    assert hashing.tree_sha256(parts) == f"sha256:{expected}"


def test_tensor_digest_is_sha256_over_headers_and_piece_digests(small_pieces):
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.LayerNorm(20))
    model[0].to(torch.bfloat16)
    expected = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        dtype = str(tensor.dtype).replace("torch.", "")
        expected.update(f"{name}|{dtype}|{tuple(tensor.shape)}".encode() + b"\0")
        raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        expected.update(_pieces(raw, small_pieces))  # the bf16 weight: 2 pieces
    assert tensor_digest(model) == f"sha256:{expected.hexdigest()}"


def test_tensor_digest_of_a_transposed_view_hashes_its_values_in_order(small_pieces):
    weight = torch.arange(600, dtype=torch.float32).reshape(20, 30)
    a, b = torch.nn.Linear(20, 30, bias=False), torch.nn.Linear(20, 30, bias=False)
    a.weight = torch.nn.Parameter(weight.t())  # not contiguous
    b.weight = torch.nn.Parameter(weight.t().contiguous())
    assert tensor_digest(a) == tensor_digest(b)


def test_hash_workers_are_bounded():
    assert 1 <= hashing.hash_workers() <= hashing.MAX_WORKERS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_digest_does_not_depend_on_the_device(small_pieces):
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200))
    model.to(torch.bfloat16)
    on_host = tensor_digest(model)
    assert tensor_digest(model.to("cuda")) == on_host
