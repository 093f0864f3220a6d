"""With `--json`, every exit prints exactly one JSON object on stdout, usage errors included."""

from __future__ import annotations

import pytest

from tests.faults.conftest import error_lines, invoke


@pytest.mark.parametrize("args", [
    ["certify", "--no-such-flag", "--json"],
    ["certify", "--profile", "huge", "--json"],
    ["certify", "--batch-size", "0", "--json"],
    ["verify", "--json"],
    ["doctor", "--json", "--tier", "x"],
    ["plugins", "gadgets", "--json"],
])
def test_usage_error_with_json_prints_one_error_object(args):
    code, payload, stderr = invoke(*args)
    assert code == 2
    assert payload["verdict"] == "ERROR" and payload["exit_code"] == 2 and payload["error"]
    assert len(error_lines(stderr)) == 1 and "Usage:" not in stderr


def test_usage_error_without_json_keeps_the_usage_hint():
    code, payload, stderr = invoke("certify", "--no-such-flag")
    assert code == 2 and payload is None and "no such option" in stderr.lower()
