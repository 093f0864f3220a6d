"""Tests for invarlock.cache: keyed, atomic, and never trusting a foreign or corrupt entry."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, replace

import pytest

from invarlock.cache import (
    FORMAT,
    BaselineCache,
    CacheKey,
    Namespace,
    entry_hmac,
    payload_digest,
    read_secret,
)
from invarlock.errors import InputError

KEY = CacheKey("sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64, "ppl_causal",
               "float32", "cpu", "0.1.0")
_SET = {"window_ids": [1, 2], "sha256": ["a" * 64, "b" * 64],
        "fed_sha256": ["c" * 64, "d" * 64], "tokens": [127, 127], "values": [301.25, 299.5]}
PAYLOAD = {"parameters": 1000, "sets": {"preview": _SET, "final": _SET}, "guards": {}}


def test_round_trip_and_key_sensitivity(tmp_path):
    cache = BaselineCache(tmp_path)
    assert cache.load(KEY) is None
    digest = cache.store(KEY, PAYLOAD)
    hit = cache.load(KEY)
    assert hit.payload == PAYLOAD and hit.digest == digest
    for field in ("weights_digest", "plan_digest", "dtype", "device_type", "tool_version"):
        assert cache.load(replace(KEY, **{field: "other"})) is None


def test_corrupt_entry_is_ignored(tmp_path, caplog):
    cache = BaselineCache(tmp_path)
    cache.store(KEY, PAYLOAD)
    cache.path(KEY).write_text("{not json")
    assert cache.load(KEY) is None
    assert "unreadable" in caplog.text


def test_entry_with_foreign_key_is_ignored(tmp_path):
    cache = BaselineCache(tmp_path)
    cache.store(KEY, PAYLOAD)
    other = replace(KEY, metric="ppl_mlm")
    cache.store(other, PAYLOAD)
    cache.path(KEY).write_bytes(cache.path(other).read_bytes())  # right name, wrong content
    assert cache.load(KEY) is None


def test_no_temporary_files_left_behind(tmp_path):
    cache = BaselineCache(tmp_path)
    cache.store(KEY, PAYLOAD)
    files = list((tmp_path / "baseline").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"


def test_default_dir_honours_environment(monkeypatch, tmp_path):
    from invarlock.cache import default_cache_dir

    monkeypatch.setenv("INVARLOCK_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("INVARLOCK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "invarlock"


# --- keyed with a secret, namespaced by trust --------------------------------------------------

SECRET = b"s" * 32


def _plant(cache, key, payload, **extra):
    """Write an entry the way someone without the secret can: valid self-digest, any HMAC."""
    entry = {"format": FORMAT, "key": asdict(key),
             "payload_digest": payload_digest(payload), "payload": payload, **extra}
    path = cache.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))


def _forged(payload):
    forged = copy.deepcopy(payload)
    forged["sets"]["final"]["values"] = [v * 0.5 for v in forged["sets"]["final"]["values"]]
    return forged


def test_signed_cache_round_trip_and_entry_carries_hmac(tmp_path):
    cache = BaselineCache(tmp_path, secret=SECRET, namespace=Namespace.TRUSTED)
    digest = cache.store(KEY, PAYLOAD)
    assert cache.path(KEY).parent == tmp_path / "trusted" / "baseline"
    entry = json.loads(cache.path(KEY).read_text())
    assert entry["hmac"].startswith("hmac-sha256:") and entry["namespace"] == "trusted"
    assert SECRET.decode() not in cache.path(KEY).read_text() and "s" * 32 not in repr(cache)
    hit = cache.load(KEY)
    assert hit is not None and hit.payload == PAYLOAD and hit.digest == digest


def test_without_a_secret_an_unsigned_entry_is_used_as_before(tmp_path):
    cache = BaselineCache(tmp_path)
    _plant(cache, KEY, PAYLOAD)
    assert cache.load(KEY).payload == PAYLOAD


def test_planted_entry_without_hmac_is_ignored_when_a_secret_is_set(tmp_path, caplog):
    cache = BaselineCache(tmp_path, secret=SECRET)
    _plant(cache, KEY, _forged(PAYLOAD))
    assert cache.load(KEY) is None
    assert "no HMAC" in caplog.text


def test_entry_signed_with_another_secret_is_ignored(tmp_path, caplog):
    cache = BaselineCache(tmp_path, secret=SECRET)
    other = BaselineCache(tmp_path, secret=b"x" * 32)
    other.store(KEY, _forged(PAYLOAD))
    assert cache.load(KEY) is None
    assert "HMAC does not verify" in caplog.text
    # a forged tag over the forged content, with a guessed key, fails the same way
    _plant(cache, KEY, _forged(PAYLOAD),
           hmac=entry_hmac(b"guess" * 4, "local", {"payload": _forged(PAYLOAD)}))
    assert cache.load(KEY) is None


def test_payload_altered_after_signing_is_ignored(tmp_path):
    cache = BaselineCache(tmp_path, secret=SECRET)
    cache.store(KEY, PAYLOAD)
    entry = json.loads(cache.path(KEY).read_text())
    forged = _forged(PAYLOAD)
    entry["payload"], entry["payload_digest"] = forged, payload_digest(forged)  # self-digest ok
    cache.path(KEY).write_text(json.dumps(entry))
    assert cache.load(KEY) is None


def test_untrusted_namespace_is_never_read_by_a_trusted_run(tmp_path):
    fork = BaselineCache(tmp_path, secret=SECRET, namespace=Namespace.UNTRUSTED)
    trusted = BaselineCache(tmp_path, secret=SECRET, namespace=Namespace.TRUSTED)
    fork.store(KEY, _forged(PAYLOAD))
    assert fork.load(KEY) is not None  # the fork reads back its own results
    assert trusted.load(KEY) is None  # a separate folder
    # copied into the trusted folder, it still does not verify (per-namespace key)
    trusted.path(KEY).parent.mkdir(parents=True)
    shutil.copy(fork.path(KEY), trusted.path(KEY))
    assert trusted.load(KEY) is None
    # and without a secret the namespace field alone keeps it out
    unsigned_fork = BaselineCache(tmp_path / "u", namespace=Namespace.UNTRUSTED)
    unsigned = BaselineCache(tmp_path / "u", namespace=Namespace.TRUSTED)
    unsigned_fork.store(KEY, PAYLOAD)
    unsigned.path(KEY).parent.mkdir(parents=True)
    shutil.copy(unsigned_fork.path(KEY), unsigned.path(KEY))
    assert unsigned.load(KEY) is None


def test_secret_file_is_read_and_checked(tmp_path, caplog):
    good = tmp_path / "secret"
    good.write_bytes(b"0123456789abcdef0123\n")
    good.chmod(0o600)
    assert read_secret(good) == b"0123456789abcdef0123"
    assert "other users" not in caplog.text
    good.chmod(0o644)
    read_secret(good)
    assert "can be read by other users" in caplog.text
    short = tmp_path / "short"
    short.write_bytes(b"abc\n")
    with pytest.raises(InputError, match="at least 16"):
        read_secret(short)
    with pytest.raises(InputError, match="not found"):
        read_secret(tmp_path / "missing")
