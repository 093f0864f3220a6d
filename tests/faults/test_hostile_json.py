"""Deeply nested JSON handed to `verify` or `report` is refused in one line (exit 2)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import error_lines, invoke


def _deep(tmp_path, depth):
    path = tmp_path / "deep.json"
    path.write_text('{"a":' * depth + "1" + "}" * depth)
    return path


@pytest.mark.parametrize("depth", [200, 100_000])
def test_verify_refuses_deeply_nested_json(depth, tmp_path):
    code, report, stderr = invoke("verify", str(_deep(tmp_path, depth)), "--json")
    assert code == 2 and report["exit_code"] == 2
    (entry,) = report["certificates"]
    assert entry["verified"] is False and "nested" in entry["differences"][0]
    assert "internal error" not in stderr


@pytest.mark.parametrize("depth", [200, 100_000])
def test_report_refuses_deeply_nested_json(depth, tmp_path):
    code, _, stderr = invoke("report", str(_deep(tmp_path, depth)))
    assert code == 2
    (line,) = error_lines(stderr)
    assert "nested" in line and "internal error" not in line


def test_report_json_of_a_certificate_holding_nan_is_strict_json(tmp_path):
    """A hand-edited certificate may hold NaN (Python's json reads it); the JSON report of it
    still parses everywhere."""
    import json

    from tests.certs import synthetic_certificate

    cert = synthetic_certificate(shift=0.0, seed=1)
    cert["primary_metric"]["limit"] = float("nan")
    path = tmp_path / "nan.cert.json"
    path.write_text(json.dumps(cert))  # Python writes the NaN literal
    from click.testing import CliRunner

    from invarlock.cli import main

    result = CliRunner().invoke(main, ["report", str(path), "--format", "json"])
    assert result.exit_code == 0
    summary = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["verification"]["verified"] is False
