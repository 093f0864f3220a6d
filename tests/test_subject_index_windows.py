"""The multi-subject index says how many final windows each subject used: a row field that
`verify` holds to the certificate, and a column of index.md."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from invarlock.subject_index import row_differences
from invarlock.subjects import SubjectResult, index_document, index_markdown
from tests.certs import synthetic_certificate


@pytest.fixture(scope="module")
def doc() -> dict:
    certs = {"int8": synthetic_certificate(n=200, seed=11, sequential=True),
             "q2": synthetic_certificate(shift=0.2, n=200, seed=12, sequential=True),
             "fixed": synthetic_certificate(seed=1)}
    results = [SubjectResult(name, cert["subject"]["source"], SimpleNamespace(
                   certificate=cert, verdict=cert["verdict"]["status"]), None,
                   0 if cert["verdict"]["status"] == "PASS" else 1)
               for name, cert in certs.items()]
    results.append(SubjectResult("broken", "models/broken", None, "no weights", 2))
    document = index_document(certs["int8"]["baseline"], results)
    return {"index": document, "certs": certs}


def _rows(doc: dict) -> dict[str, dict]:
    return {row["name"]: row for row in doc["index"]["subjects"]}


def test_each_row_records_the_final_windows_and_where_the_sequential_test_decided(doc):
    rows = _rows(doc)
    assert rows["int8"]["final_windows"] == {"evaluated": 32, "planned": 200}
    assert rows["int8"]["sequential"] == "decided after 32 of 200 windows (PASS)"
    assert rows["q2"]["sequential"] == "decided after 32 of 200 windows (FAIL)"
    assert rows["fixed"]["final_windows"] == {"evaluated": 32, "planned": 32}
    assert rows["fixed"]["sequential"] is None
    assert rows["broken"]["final_windows"] is None and rows["broken"]["sequential"] is None


def test_index_md_has_a_final_windows_column(doc):
    text = index_markdown(doc["index"])
    assert "| final windows (sequential test) |" in text
    cells = [line.split(" | ")[5] for line in text.splitlines() if line.startswith("| models")]
    assert cells == ["decided after 32 of 200 windows \\(PASS\\)",
                     "decided after 32 of 200 windows \\(FAIL\\)", "32/32", "–"]


def test_a_row_that_misstates_the_windows_does_not_match_its_certificate(doc):
    rows, certs = _rows(doc), doc["certs"]
    assert row_differences(rows["int8"], certs["int8"], doc["index"]) == []
    claimed = {**rows["int8"], "final_windows": {"evaluated": 200, "planned": 200}}
    assert row_differences(claimed, certs["int8"], doc["index"]) == [
        "index.json: final_windows {'evaluated': 200, 'planned': 200} but the certificate "
        "says {'evaluated': 32, 'planned': 200}"]
    early = {**rows["fixed"], "sequential": "decided after 8 of 32 windows (PASS)"}
    assert any("sequential" in d for d in row_differences(early, certs["fixed"], doc["index"]))
    older = {k: v for k, v in rows["int8"].items() if k not in ("final_windows", "sequential")}
    assert row_differences(older, certs["int8"], doc["index"]) == []
