"""The certificate set (JSON, Markdown, HTML) of a run appears together or not at all, and an
older run in the same folder is never mixed with a new one."""

from __future__ import annotations

import errno
import json

import pytest

from invarlock import atomic
from invarlock.certificate import document
from tests.faults.conftest import certify, error_lines

HTML = "evaluation.report.html"
SET = (document.CERT_FILENAME, document.MARKDOWN_FILENAME, HTML)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def passed_run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pass") / "run"
    code, _summary, _ = certify(tiny_gpt2_dir, tiny_gpt2_dir, out, sonnets_path, fast_preset)
    assert code == 0
    return out


@pytest.mark.parametrize("failing", [document.MARKDOWN_FILENAME, HTML, document.CERT_FILENAME])
def test_full_disk_while_writing_leaves_the_previous_set_untouched(
        failing, passed_run, broken_subjects, tiny_gpt2_dir, sonnets_path, fast_preset,
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    for name, data in _snapshot(passed_run).items():
        (out / name).write_bytes(data)
    before = _snapshot(out)
    real = atomic.write_bytes

    def disk_full(path, data):
        if str(path).endswith(failing):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(atomic, "write_bytes", disk_full)
    code, payload, stderr = certify(tiny_gpt2_dir, broken_subjects["other depth"], out,
                                    sonnets_path, fast_preset)
    assert code == 3 and "No space left on device" in payload["error"]
    assert len(error_lines(stderr)) == 1
    assert _snapshot(out) == before  # the PASS set stands whole; no lone FAIL rendering
    assert sorted(p.name for p in out.iterdir()) == sorted(SET)


def test_new_run_replaces_the_whole_set_of_an_older_run(passed_run, broken_subjects,
                                                        tiny_gpt2_dir, sonnets_path,
                                                        fast_preset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name, data in _snapshot(passed_run).items():
        (out / name).write_bytes(data)
    no_report = tmp_path / "no-report.yaml"
    no_report.write_text("output: {save_report: false}\n")
    code, _summary, _ = certify(tiny_gpt2_dir, broken_subjects["other depth"], out,
                               sonnets_path, fast_preset, "--preset", str(no_report))
    assert code == 1
    cert = json.loads((out / document.CERT_FILENAME).read_text())
    assert cert["verdict"]["status"] == "FAIL"
    assert (out / document.MARKDOWN_FILENAME).read_text().startswith("# ❌")
    assert not (out / HTML).exists()  # the older PASS page is gone
    assert sorted(p.name for p in out.iterdir()) == [document.CERT_FILENAME,
                                                     document.MARKDOWN_FILENAME]
