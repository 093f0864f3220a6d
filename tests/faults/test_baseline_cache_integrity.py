"""A baseline cache entry is trusted only when it matches its schema and its payload digest
(and, with a cache secret, its HMAC and trust namespace); anything else is ignored, reported
once, and replaced by the run that re-evaluates."""

from __future__ import annotations

import json

import pytest

from invarlock.certificate import document
from tests.faults.conftest import certify, invoke


def _run(tiny_gpt2_dir, sonnets_path, fast_preset, out, cache, *extra):
    return certify(tiny_gpt2_dir, tiny_gpt2_dir, out, sonnets_path, fast_preset,
                   "--cache-dir", str(cache), *extra)


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


# --- planted entries: a self-digest proves nothing about who wrote it ------------------------

@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_gpt2_dir):
    """The tiny GPT-2 with its embedding scaled ×20: far worse than its baseline (FAIL)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(tiny_gpt2_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("wte.weight"))
    tensors[name] = tensors[name] * 20
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _plant_as_baseline(attacker_entry, baseline_digest, shared, namespace=None, **extra):
    """The attacker's own entry (the damaged model's results), re-keyed to the baseline's
    weights digest: its payload and payload digest untouched, so it is self-consistent."""
    from invarlock.cache import CacheKey

    entry = json.loads(attacker_entry.read_text())
    entry["key"]["weights_digest"] = baseline_digest
    if namespace:
        entry["namespace"] = namespace
    entry.update(extra)
    folder = shared / namespace if namespace else shared
    path = folder / "baseline" / f"{CacheKey(**entry['key']).digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_gpt2_dir, damaged, sonnets_path, fast_preset):
    """The honest verdict (FAIL) and an attacker's entry: the damaged model judged against
    itself, written by a run the attacker controls."""
    root = tmp_path_factory.mktemp("planted")
    code, summary, _ = certify(tiny_gpt2_dir, damaged, root / "honest", sonnets_path,
                               fast_preset, "--no-cache")
    assert code == 1, summary  # the damaged subject fails against its real baseline
    honest = document.load_certificate(summary["certificate"])
    code, _summary, _ = certify(damaged, damaged, root / "attacker", sonnets_path,
                                fast_preset, "--cache-dir", str(root / "attacker-cache"))
    assert code == 0
    (entry,) = (root / "attacker-cache" / "baseline").glob("*.json")
    return honest["baseline"]["weights_digest"], entry


def test_planted_entry_is_a_false_pass_of_the_metric_without_a_secret(
        planted, tiny_gpt2_dir, damaged, sonnets_path, fast_preset, tmp_path):
    """The attack, as it works on a shared cache without a secret: the planted entry is
    reused and the damaged subject's metric passes, because the baseline's results were
    replaced by its own. Only the guards that compare the subject's weights with the
    baseline's files, which no cache entry stands in for, still fail it."""
    digest, entry = planted
    _plant_as_baseline(entry, digest, tmp_path / "shared")
    code, summary, _ = certify(tiny_gpt2_dir, damaged, tmp_path / "out", sonnets_path,
                               fast_preset, "--cache-dir", str(tmp_path / "shared"))
    cert = document.load_certificate(summary["certificate"])
    assert cert["baseline"]["results_from_cache"] is True
    pm = cert["primary_metric"]
    assert pm["ratio"] == 1.0 and pm["delta"]["estimate"] == 0.0  # judged against itself
    failed = {name for name, ok in cert["validation"].items() if not ok}
    assert failed == {"evidence_meets_profile", "spectral_stable", "rows_stable"}
    assert code == 1


@pytest.mark.parametrize("tag", ["missing", "forged"])
def test_planted_entry_is_ignored_and_the_baseline_evaluated_when_a_secret_is_set(
        tag, planted, tiny_gpt2_dir, damaged, sonnets_path, fast_preset, tmp_path):
    digest, entry = planted
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    extra = {"hmac": "hmac-sha256:" + "0" * 64} if tag == "forged" else {}
    _plant_as_baseline(entry, digest, tmp_path / "shared", "trusted", **extra)
    code, summary, stderr = certify(
        tiny_gpt2_dir, damaged, tmp_path / "out", sonnets_path, fast_preset,
        "--cache-dir", str(tmp_path / "shared"), "--cache-secret-file", str(secret),
        "--cache-namespace", "trusted")
    assert code == 1, summary  # the honest verdict
    assert stderr.count("ignoring baseline cache entry") == 1
    assert ("no HMAC" if tag == "missing" else "HMAC does not verify") in stderr
    cert = document.load_certificate(summary["certificate"])
    assert cert["baseline"]["results_from_cache"] is False


def test_fork_namespace_entry_is_not_read_by_a_trusted_run(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    monkeypatch.setenv("INVARLOCK_CACHE_SECRET_FILE", str(secret))
    shared = tmp_path / "shared"

    def run(out, namespace):
        code, summary, stderr = _run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path / out,
                                     shared, "--cache-namespace", namespace)
        assert code == 0, summary
        return document.load_certificate(summary["certificate"]), stderr

    run("fork", "untrusted")
    (fork_entry,) = (shared / "untrusted" / "baseline").glob("*.json")
    trusted, _ = run("trusted", "trusted")
    assert trusted["baseline"]["results_from_cache"] is False  # another folder
    # copied across, it does not verify under the trusted namespace's key
    target = shared / "trusted" / "baseline" / fork_entry.name
    target.write_bytes(fork_entry.read_bytes())
    again, stderr = run("again", "trusted")
    assert again["baseline"]["results_from_cache"] is False
    assert "HMAC does not verify" in stderr


@pytest.mark.parametrize("command", ["certify", "run"])
def test_an_unusable_cache_secret_is_one_line_and_exit_2(
        command, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, monkeypatch):
    from tests.faults.conftest import error_lines

    secret = tmp_path / "secret"
    secret.write_text("short\n")
    monkeypatch.setenv("INVARLOCK_CACHE_SECRET_FILE", str(secret))
    if command == "certify":
        code, _summary, stderr = _run(tiny_gpt2_dir, sonnets_path, fast_preset,
                                      tmp_path / "out", tmp_path / "cache")
    else:
        config = tmp_path / "run.yaml"
        config.write_text(f"model: {{id: {tiny_gpt2_dir}, subject: {tiny_gpt2_dir}}}\n"
                          f"dataset: {{provider: text, path: {sonnets_path}}}\n"
                          f"output: {{dir: {tmp_path / 'out'}}}\n")
        code, _summary, stderr = invoke("run", "-c", str(config), "--json")
    assert code == 2
    (line,) = error_lines(stderr)
    assert "cache secret file" in line and "at least 16" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
