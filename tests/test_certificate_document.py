"""Tests for the certificate document: schema, digest, atomic writing, rendering."""

from __future__ import annotations

import json

import pytest

from invarlock import atomic
from invarlock.certificate import document, markdown
from invarlock.enums import MetricKind
from invarlock.errors import InputError, TamperedCertificateError
from tests.certs import synthetic_certificate


@pytest.mark.parametrize("kwargs", [
    {}, {"shift": 0.3}, {"shift": 1.2}, {"kind": MetricKind.ACCURACY},
    {"kind": MetricKind.ACCURACY, "shift": 0.1},
])
def test_certificates_of_every_outcome_match_the_schema(kwargs):
    cert = synthetic_certificate(**kwargs)
    assert document.schema_errors(cert) == []
    assert cert["digest"] == document.content_digest(cert)


def test_digest_changes_when_any_number_changes():
    cert = synthetic_certificate()
    tampered = json.loads(json.dumps(cert))
    tampered["windows"]["final"]["subject"][0] += 1e-9
    assert document.content_digest(tampered) != cert["digest"]


def test_schema_rejects_missing_fields_and_bad_verdicts():
    cert = synthetic_certificate()
    broken = {k: v for k, v in cert.items() if k != "pairing"}
    assert any("pairing" in e for e in document.schema_errors(broken))
    cert2 = json.loads(json.dumps(cert))
    cert2["verdict"]["status"] = "MAYBE"
    assert any("verdict.status" in e for e in document.schema_errors(cert2))


def test_seal_refuses_a_certificate_that_breaks_the_schema():
    cert = synthetic_certificate()
    cert.pop("digest")
    cert["pairing"]["match"] = 2.0
    with pytest.raises(ValueError, match="does not match its schema"):
        document.seal(cert)


def test_write_and_load_round_trip(tmp_path):
    cert = synthetic_certificate(shift=0.3)
    path = document.write_certificate(cert, tmp_path / "out", markdown.render(cert))
    assert document.load_certificate(path) == cert
    assert document.load_certificate(tmp_path / "out") == cert  # a run folder works too
    assert (tmp_path / "out" / document.MARKDOWN_FILENAME).read_text().startswith("# ❌")


def test_interrupted_write_leaves_previous_certificate_intact(tmp_path, monkeypatch):
    good = synthetic_certificate()
    path = document.write_certificate(good, tmp_path, markdown.render(good))
    before = path.read_bytes()

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        document.write_certificate(synthetic_certificate(shift=0.3), tmp_path, "x")
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="not found"):
        document.load_certificate(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(TamperedCertificateError, match="not valid JSON"):
        document.load_certificate(bad)


def test_markdown_leads_with_verdict_and_the_gate_number():
    text = markdown.render(synthetic_certificate(shift=0.3))
    first, _, second = text.splitlines()[:3]
    assert first == "# ❌ InvarLock certificate: FAIL"
    assert "upper bound" in second and "> 1.10" in second
    passing = markdown.render(synthetic_certificate())
    assert passing.startswith("# ✅ InvarLock certificate: PASS")
    catastrophic = markdown.render(synthetic_certificate(shift=1.2))
    assert "Catastrophic degradation" in catastrophic and "not evaluated" in catastrophic


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def _gguf_format(type_parameters: dict[str, int]) -> dict:
    """The `format` record certify writes for a GGUF file with these tensor types."""
    pytest.importorskip("gguf", reason="the GGUF record needs the gguf extra")
    from pathlib import Path

    from invarlock.models.gguf_file import GGUFInfo
    from invarlock.models.quantized import gguf_format

    info = GGUFInfo(Path("model-Q4_K_M.gguf"), "llama", {}, (), {
        "Q4_K": 150, "Q6_K": 30, "F32": 60}, True, type_parameters)
    return gguf_format(info)


def test_a_gguf_certificate_with_mixed_types_matches_the_schema():
    """The GGUF fields (tensor types and their parameters, the mixed-types flag, the
    architecture) are described by the schema, so a certificate carrying them validates."""
    record = _gguf_format({"Q4_K": 2_000_000, "Q6_K": 300_000, "F32": 4_000})
    assert record["file_type"] == "Q4_K" and record["bits"] == 4 and record["mixed_types"]
    cert = synthetic_certificate()
    cert["subject"]["format"] = record
    assert document.schema_errors(cert) == []
    single = _gguf_format({"Q8_0": 2_000_000, "F32": 4_000})
    assert single["mixed_types"] is False
    cert["subject"]["format"] = single
    assert document.schema_errors(cert) == []


@pytest.mark.parametrize(("field", "value"), [
    ("tensor_parameters", {"Q4_K": -5}), ("tensor_parameters", {"Q4_K": 1.5}),
    ("tensor_parameters", "Q4_K"), ("mixed_types", "no"), ("gguf_architecture", 7),
    ("runtime", {"name": "another-runtime", "version": None}),
    ("runtime", {"name": "llama.cpp", "version": "0.3", "threads": 0}),
])
def test_the_schema_rejects_a_malformed_gguf_record(field, value):
    cert = synthetic_certificate()
    cert["subject"]["format"] = {**_gguf_format({"Q4_K": 2_000_000, "F32": 4_000}),
                                 field: value}
    assert any(e.startswith("subject.format") for e in document.schema_errors(cert))
