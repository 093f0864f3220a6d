"""One output folder, one run's result: a single-subject certificate set and an index of
several subjects never end up side by side, and `verify` never checks a stale file while
another result is there.

A run whose result would sit beside an older result of the other shape is refused with exit 2
before anything is evaluated, and the folder is left exactly as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from invarlock import certify as pipeline
from invarlock import subjects
from invarlock.certificate import document
from invarlock.certificate import markdown as md
from invarlock.errors import EvidenceError
from tests.certs import synthetic_certificate
from tests.faults.conftest import error_lines, invoke


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _single(out: Path) -> Path:
    cert = synthetic_certificate(shift=0.0, seed=3)
    document.write_certificate(cert, out, md.render(cert))
    return out


def _indexed(out: Path, specs: list[str]) -> Path:
    """An index of `specs` as a run with several subjects writes it, certificates included."""
    results = []
    for i, (spec, name) in enumerate(zip(specs, subjects.folder_names(specs), strict=True)):
        cert = synthetic_certificate(shift=0.0, seed=10 + i)
        cert = document.seal({**cert, "subject": {**cert["subject"], "source": spec}})
        document.write_certificate(cert, out / name, md.render(cert))
        outcome = SimpleNamespace(certificate=cert, verdict=cert["verdict"]["status"])
        results.append(subjects.SubjectResult(name, spec, outcome, None, 0))
    subjects.write_index(out, cert["baseline"], results)
    return out


@pytest.fixture
def nothing_evaluated(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("evaluation started although the output folder is refused")

    monkeypatch.setattr(pipeline, "plan_evaluation", refuse)


def _certify(baseline, subjects_, out, dataset, preset):
    args = ["certify", "--baseline", str(baseline), "--dataset", str(dataset), "--profile",
            "dev", "--preset", str(preset), "--out", str(out), "--no-cache", "--json"]
    for subject in subjects_:
        args += ["--subject", str(subject)]
    return invoke(*args)


def test_several_subjects_into_a_single_subject_folder_are_refused_first(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, nothing_evaluated):
    out = _single(tmp_path / "out")
    before = _snapshot(out)
    code, payload, stderr = _certify(tiny_gpt2_dir, [tiny_gpt2_dir, tiny_gpt2_dir], out,
                                     sonnets_path, fast_preset)
    assert code == 2 and "earlier single-subject run" in payload["error"]
    assert len(error_lines(stderr)) == 1
    assert _snapshot(out) == before


def test_one_subject_into_a_folder_with_an_index_is_refused_first(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, nothing_evaluated):
    out = _indexed(tmp_path / "out", ["models/a", "models/b"])
    before = _snapshot(out)
    code, payload, _ = _certify(tiny_gpt2_dir, [tiny_gpt2_dir], out, sonnets_path,
                                fast_preset)
    assert code == 2 and "index.json of an earlier run with several subjects" in payload["error"]
    assert _snapshot(out) == before


def test_an_edit_into_a_folder_with_an_index_is_refused_first(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, nothing_evaluated):
    out = _indexed(tmp_path / "out", ["models/a", "models/b"])
    (out / "index.json").unlink()  # the table alone still marks the older result
    before = _snapshot(out)
    code, payload, _ = invoke("certify", "--baseline", str(tiny_gpt2_dir), "--edit",
                              "quant_rtn", "--dataset", str(sonnets_path), "--profile", "dev",
                              "--preset", str(fast_preset), "--out", str(out), "--json")
    assert code == 2 and "index.md of an earlier run" in payload["error"]
    assert _snapshot(out) == before


def test_several_subjects_beside_a_subject_folder_they_would_not_list_are_refused(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, nothing_evaluated):
    out = _indexed(tmp_path / "out", ["models/a", "models/old"])
    before = _snapshot(out)
    a = shutil.copytree(tiny_gpt2_dir, tmp_path / "models" / "a")
    b = shutil.copytree(tiny_gpt2_dir, tmp_path / "models" / "b")
    code, payload, _ = _certify(tiny_gpt2_dir, [a, b], out, sonnets_path, fast_preset)
    assert code == 2 and "'old', a subject folder of an earlier run" in payload["error"]
    assert _snapshot(out) == before


def test_verify_refuses_a_folder_holding_both_results(tmp_path):
    out = _indexed(tmp_path / "out", ["models/a", "models/b"])
    assert invoke("verify", str(out), "--json")[0] == 0  # the index alone verifies
    cert = synthetic_certificate(shift=0.0, seed=3)
    document.write_certificate(cert, out, md.render(cert))
    assert invoke("verify", str(out / document.CERT_FILENAME), "--json")[0] == 0
    code, report, _ = invoke("verify", str(out), "--json")
    assert code == 2
    assert "results of two runs are mixed" in report["certificates"][0]["differences"][0]


def test_rerun_replaces_every_subject_and_an_error_leaves_no_older_certificate(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, monkeypatch):
    a = shutil.copytree(tiny_gpt2_dir, tmp_path / "models" / "a")
    b = shutil.copytree(tiny_gpt2_dir, tmp_path / "models" / "b")
    out = _indexed(tmp_path / "out", [str(a), str(b)])
    old_a = (out / "a" / document.CERT_FILENAME).read_bytes()
    real = pipeline.certify_subject

    def second_fails(inputs, *args, **kwargs):
        if inputs.out_dir.name == "b":
            raise EvidenceError("the subject's windows could not be paired")
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "certify_subject", second_fails)
    code, summary, _ = _certify(tiny_gpt2_dir, [a, b], out, sonnets_path, fast_preset)
    assert code == 3 and [r["verdict"] for r in summary["subjects"]] == ["PASS", "ERROR"]
    assert not (out / "b" / document.CERT_FILENAME).exists()  # the older PASS is gone
    assert old_a != (out / "a" / document.CERT_FILENAME).read_bytes()  # certified anew
    v_code, report, _ = invoke("verify", str(out), "--json")
    assert v_code == 1  # verified, and one subject has no certificate: not a pass
    assert [c["verdict"] for c in report["certificates"]] == ["PASS", "ERROR"]
    assert all(c["verified"] for c in report["certificates"])
