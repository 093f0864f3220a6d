"""A baseline cache entry is trusted only when it matches its schema and its payload digest;
anything else is ignored, reported once, and replaced by the run that re-evaluates."""

from __future__ import annotations

import json

import pytest

from invarlock.certificate import document
from tests.faults.conftest import certify, invoke


def _run(tiny_gpt2_dir, sonnets_path, fast_preset, out, cache):
    return certify(tiny_gpt2_dir, tiny_gpt2_dir, out, sonnets_path, fast_preset,
                   "--cache-dir", str(cache))


@pytest.fixture
def cached(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    """A cache holding one genuine baseline entry, and the certificate that stored it."""
    cache = tmp_path / "cache"
    code, summary, _ = _run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path / "first", cache)
    assert code == 0
    (entry,) = (cache / "baseline").glob("*.json")
    return cache, entry, document.load_certificate(summary["certificate"])


def _corrupt(entry, how):
    data = json.loads(entry.read_text())
    if how == "wrong shape":  # valid JSON, the right key, a payload of the wrong shape
        data["payload"]["sets"] = {"preview": [1, 2], "final": "x"}
    elif how == "altered numbers":  # per-window losses changed, digest left as it was
        data["payload"]["sets"]["final"]["values"][0] *= 0.5
    elif how == "ragged arrays":
        data["payload"]["sets"]["final"]["values"].pop()
    entry.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["wrong shape", "altered numbers", "ragged arrays"])
def test_bad_cache_entry_is_ignored_reported_once_and_replaced(
        how, cached, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    cache, entry, first = cached
    _corrupt(entry, how)
    code, summary, stderr = _run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path / "2", cache)
    assert code == 0, summary
    assert stderr.count("ignoring baseline cache entry") == 1
    cert = document.load_certificate(summary["certificate"])
    assert cert["baseline"]["results_from_cache"] is False
    assert cert["windows"]["final"]["baseline"] == first["windows"]["final"]["baseline"]
    # replaced: the next run takes the baseline from the cache again, without a warning
    code, summary, stderr = _run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path / "3", cache)
    assert code == 0 and "ignoring baseline cache entry" not in stderr
    third = document.load_certificate(summary["certificate"])
    assert third["baseline"]["results_from_cache"] is True
    assert third["windows"] == first["windows"]


def test_certificate_records_the_digest_of_the_cache_payload_it_used(
        cached, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    cache, entry, first = cached
    stored = json.loads(entry.read_text())["payload_digest"]
    assert first["baseline"]["cache_payload_digest"] == stored
    _code, summary, _ = _run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path / "2", cache)
    second = document.load_certificate(summary["certificate"])
    assert second["baseline"]["results_from_cache"] is True
    assert second["baseline"]["cache_payload_digest"] == stored
    assert invoke("verify", summary["certificate"], "--json")[0] == 0
