"""Tests for invarlock.cache: keyed, atomic, and never trusting a foreign or corrupt entry."""

from __future__ import annotations

from dataclasses import replace

from invarlock.cache import BaselineCache, CacheKey

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
