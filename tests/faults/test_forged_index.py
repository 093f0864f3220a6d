"""`verify OUT` on the folder of a run with several subjects rejects every forged index.

The attacker edits `index.json` and then recomputes its digest (a digest authenticates
nothing); every attack below is tried both re-sealed and not. The genuine folder holds one
PASS and one FAIL subject, so an index that hides the FAIL would turn exit 1 into exit 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from invarlock import subject_index
from tests.faults.conftest import invoke


@pytest.fixture(scope="module")
def genuine(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path_factory) -> Path:
    """A real run: subject `same` (the baseline's weights) passes, `broken` fails."""
    from tests.test_certify_cli import _scaled_copy

    root = tmp_path_factory.mktemp("index")
    same = shutil.copytree(tiny_gpt2_dir, root / "models" / "same")
    broken = _scaled_copy(tiny_gpt2_dir, root / "models" / "broken", 8.0)
    out = root / "out"
    code, summary, _ = invoke("certify", "--baseline", str(tiny_gpt2_dir), "--subject",
                              str(same), "--subject", str(broken), "--dataset",
                              str(sonnets_path), "--profile", "dev", "--preset",
                              str(fast_preset), "--out", str(out), "--json")
    assert code == 1, summary
    assert [row["verdict"] for row in summary["subjects"]] == ["PASS", "FAIL"]
    return out


@pytest.fixture
def out(genuine, tmp_path) -> Path:
    """A fresh copy of the genuine folder for one attack."""
    return shutil.copytree(genuine, tmp_path / "out", symlinks=True)


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _write(out: Path, doc: dict, resealed: bool) -> None:
    if resealed:
        doc = subject_index.seal(doc)
    (out / "index.json").write_text(json.dumps(doc, indent=2))


def _verify(out: Path) -> tuple[int, dict]:
    code, report, stderr = invoke("verify", str(out), "--json")
    assert "Traceback" not in stderr
    return code, report


def _problems(report: dict) -> str:
    return "\n".join(d for c in report["certificates"] for d in c["differences"])


def test_the_genuine_index_verifies_and_fails_with_its_fail_subject(genuine):
    code, report = _verify(genuine)
    assert code == 1
    assert [c["verdict"] for c in report["certificates"]] == ["PASS", "FAIL"]
    assert all(c["verified"] for c in report["certificates"])
    doc = _index(genuine)
    assert doc["version"] == subject_index.INDEX_VERSION
    assert doc["digest"] == subject_index.seal(doc)["digest"]


def test_the_index_file_itself_is_checked_with_its_folder(out):
    doc = _index(out)
    doc["subjects"], doc["exit_code"] = doc["subjects"][:1], 0
    _write(out, doc, resealed=True)
    code, report, _ = invoke("verify", str(out / "index.json"), "--json")
    assert code == 2 and "folder 'broken' holds a result" in _problems(report)


def test_an_edited_index_without_a_new_seal_is_caught(out):
    doc = _index(out)
    doc["baseline"]["source"] = "somewhere/else"
    _write(out, doc, resealed=False)
    code, report = _verify(out)
    assert code == 2 and "edited after it was sealed" in _problems(report)


@pytest.mark.parametrize("resealed", [True, False])
def test_deleting_the_fail_row(out, resealed):
    doc = _index(out)
    doc["subjects"] = [r for r in doc["subjects"] if r["verdict"] != "FAIL"]
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2
    assert "folder 'broken' holds a result but is not listed" in _problems(report)


@pytest.mark.parametrize("resealed", [True, False])
def test_pointing_the_fail_row_at_the_pass_certificate(out, resealed):
    doc = _index(out)
    passing, failing = doc["subjects"]
    failing.update(certificate=passing["certificate"], digest=passing["digest"],
                   verdict="PASS", exit_code=0)
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2 and "is not this row's certificate" in _problems(report)


@pytest.mark.parametrize("resealed", [True, False])
def test_renaming_the_fail_row_to_the_pass_folder(out, resealed):
    doc = _index(out)
    passing, failing = doc["subjects"]
    failing.update(name=passing["name"], certificate=passing["certificate"],
                   digest=passing["digest"], verdict="PASS", exit_code=0)
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2
    assert "listed twice" in _problems(report) and "not listed" in _problems(report)


@pytest.mark.parametrize("resealed", [True, False])
def test_a_row_that_misstates_its_certificate(out, resealed):
    """Verdict, exit code and subject edited together, so the row agrees with itself."""
    doc = _index(out)
    failing = doc["subjects"][1]
    failing.update(verdict="PASS", exit_code=0, subject="models/int8")
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2
    assert "index.json: verdict 'PASS' but the certificate says 'FAIL'" in _problems(report)
    assert "index.json: subject 'models/int8'" in _problems(report)


@pytest.mark.parametrize("resealed", [True, False])
def test_empty_subjects(out, resealed):
    doc = _index(out)
    doc["subjects"] = []
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2 and "subjects: empty" in _problems(report)


def test_empty_subjects_in_an_empty_folder(out):
    for row in _index(out)["subjects"]:
        shutil.rmtree(out / row["name"])
    doc = _index(out)
    doc["subjects"], doc["exit_code"] = [], 0
    _write(out, doc, resealed=True)
    code, report = _verify(out)
    assert code == 2 and "subjects: empty" in _problems(report)


@pytest.mark.parametrize("where", ["../elsewhere/evaluation.cert.json", "absolute"])
@pytest.mark.parametrize("resealed", [True, False])
def test_a_row_pointing_outside_the_folder(out, tmp_path, where, resealed):
    """The FAIL row is pointed at a genuine PASS certificate kept outside OUT."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "same", elsewhere)
    target = str(elsewhere / "evaluation.cert.json") if where == "absolute" else where
    doc = _index(out)
    passing, failing = doc["subjects"]
    shutil.rmtree(out / failing["name"])
    failing.update(certificate=target, digest=passing["digest"], verdict="PASS", exit_code=0)
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2 and "leads outside the output folder" in _problems(report)
    assert str(elsewhere) not in {c["path"] for c in report["certificates"]}


@pytest.mark.parametrize("resealed", [True, False])
def test_a_subject_folder_replaced_by_a_symlink_leading_out(out, tmp_path, resealed):
    elsewhere = shutil.copytree(out / "same", tmp_path / "elsewhere")
    doc = _index(out)
    passing, failing = doc["subjects"]
    shutil.rmtree(out / failing["name"])
    os.symlink(elsewhere, out / failing["name"])
    failing.update(digest=passing["digest"], verdict="PASS", exit_code=0)
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2 and "is a symbolic link" in _problems(report)


def test_a_certificate_file_replaced_by_a_symlink_leading_out(out, tmp_path):
    elsewhere = shutil.copytree(out / "same", tmp_path / "elsewhere")
    doc = _index(out)
    passing, failing = doc["subjects"]
    cert = out / failing["name"] / "evaluation.cert.json"
    cert.unlink()
    cert.symlink_to(elsewhere / "evaluation.cert.json")
    failing.update(digest=passing["digest"], verdict="PASS", exit_code=0)
    doc["exit_code"] = 0
    _write(out, doc, resealed=True)
    code, report = _verify(out)
    assert code == 2 and "is a symbolic link" in _problems(report)


@pytest.mark.parametrize("resealed", [True, False])
def test_an_edited_exit_code(out, resealed):
    doc = _index(out)
    doc["exit_code"] = 0
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2 and "exit_code: index says 0, its rows give 1" in _problems(report)


@pytest.mark.parametrize("resealed", [True, False])
def test_the_fail_row_turned_into_an_error_row(out, resealed):
    doc = _index(out)
    doc["subjects"][1].update(verdict="ERROR", certificate=None, digest=None, exit_code=2,
                              error="could not load")
    doc["exit_code"] = 2
    _write(out, doc, resealed)
    code, report = _verify(out)
    assert code == 2 and "holds a certificate, but the row says" in _problems(report)


def test_an_unsealed_older_index_is_not_trusted(out):
    doc = _index(out)
    doc.pop("digest")
    doc["version"] = 1
    _write(out, doc, resealed=False)
    code, report = _verify(out)
    assert code == 2 and (f"only a version {subject_index.INDEX_VERSION} index"
                          in _problems(report))


# --- index.md: the table a reviewer reads is the one index.json renders to ------------------

def _table(out: Path) -> str:
    return (out / "index.md").read_text(encoding="utf-8")


def test_the_genuine_table_is_what_the_index_renders_to(genuine):
    assert _table(genuine) == subject_index.index_markdown(_index(genuine))


def test_an_edited_table_is_rejected(out):
    """The FAIL row's verdict changed in index.md only: index.json and the certificates
    still say FAIL, so the table lies."""
    table = _table(out)
    assert table.count("| FAIL |") == 1
    (out / "index.md").write_text(table.replace("| FAIL |", "| PASS |"), encoding="utf-8")
    code, report = _verify(out)
    assert code == 2
    assert "index.md differs from the table index.json renders to, from line 6" in (
        _problems(report))


@pytest.mark.parametrize("edit", ["appended", "trailing newline dropped", "emptied"])
def test_any_change_to_the_table_is_rejected(out, edit):
    table = _table(out)
    changed = {"appended": table + "| extra | PASS | 1.0000 | – | 1.10 | – |\n",
               "trailing newline dropped": table.rstrip("\n"), "emptied": ""}[edit]
    (out / "index.md").write_text(changed, encoding="utf-8")
    code, report = _verify(out)
    assert code == 2 and "index.md differs" in _problems(report)


def test_a_table_that_matches_a_reworded_index_is_still_rejected(out):
    """Index and table edited together (re-sealed, re-rendered): the row's numbers are held
    to its certificate, so a better ratio shown for the FAIL subject does not stand."""
    doc = _index(out)
    failing = doc["subjects"][1]
    failing["ratio"], failing["ratio_ci"] = 1.0001, [0.999, 1.001]
    doc = subject_index.seal(doc)
    (out / "index.json").write_text(json.dumps(doc, indent=2))
    (out / "index.md").write_text(subject_index.index_markdown(doc), encoding="utf-8")
    code, report = _verify(out)
    assert code == 2 and "index.md differs" not in _problems(report)
    assert "index.json: ratio 1.0001 but the certificate says" in _problems(report)
    assert "index.json: ratio_ci [0.999, 1.001] but the certificate says" in _problems(report)


def test_a_missing_table_is_rejected(out):
    (out / "index.md").unlink()
    code, report = _verify(out)
    assert code == 2 and "index.md is missing" in _problems(report)


def test_a_table_replaced_by_a_symlink_is_rejected(out, tmp_path):
    elsewhere = tmp_path / "table.md"
    elsewhere.write_text(_table(out), encoding="utf-8")
    (out / "index.md").unlink()
    (out / "index.md").symlink_to(elsewhere)
    code, report = _verify(out)
    assert code == 2 and "index.md is a symbolic link" in _problems(report)


def test_a_table_that_is_not_text_is_one_line_not_a_crash(out):
    (out / "index.md").write_bytes(b"\xff\xfe\x00 not utf-8")
    code, report = _verify(out)
    assert code == 2 and "cannot read index.md" in _problems(report)


@pytest.mark.parametrize("content", ["[]", "{", '{"format": "invarlock.index"}',
                                     '{"format": "invarlock.index", "version": 3, '
                                     '"subjects": "all"}',
                                     '{"format": "invarlock.index", "version": 3, "subjects": '
                                     '[{"name": "same", "verdict": ["PASS"], "exit_code": [0], '
                                     '"certificate": {}}, {"name": ["x"]}, 7], "exit_code": NaN}',
                                     '{"format": "invarlock.index", "version": 3, "subjects": '
                                     '[{"name": "same", "verdict": {"a": 1}, "exit_code": true, '
                                     '"certificate": "same/evaluation.cert.json"}], '
                                     '"exit_code": "0", "baseline": []}'])
def test_malformed_indexes_are_one_line_not_a_crash(out, content):
    (out / "index.json").write_text(content)
    code, report = _verify(out)
    assert code == 2 and report["certificates"][0]["verified"] is False


def test_report_of_an_index_folder_names_what_to_report(genuine):
    code, _, stderr = invoke("report", str(genuine))
    assert code == 2 and "holds the index of a run with several subjects" in stderr
    assert invoke("report", str(genuine / "broken"))[0] == 0
