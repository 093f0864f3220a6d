"""`doctor` finds what `certify` would trip over, and `--json` output is strict JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.faults.conftest import invoke


def _truncated_copy(src, dst):
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])  # header intact, tensor data cut short
    return dst


def test_doctor_reports_a_truncated_safetensors_file(tiny_gpt2_dir, sonnets_path, tmp_path):
    subject = _truncated_copy(tiny_gpt2_dir, tmp_path / "cut")
    code, report, _ = invoke("doctor", "--baseline", str(tiny_gpt2_dir), "--subject",
                             str(subject), "--dataset", str(sonnets_path), "--profile", "dev",
                             "--json")
    assert code == 2
    messages = " ".join(f["message"] for f in report["findings"])
    assert "truncated" in messages


@pytest.mark.parametrize("value", ["1.10", ".nan", ".inf"])
def test_doctor_rejects_a_preset_with_a_non_finite_number(value, tiny_gpt2_dir, sonnets_path,
                                                          tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"model: {{id: {tiny_gpt2_dir}, subject: {tiny_gpt2_dir}}}\n"
                      f"dataset: {{path: {sonnets_path}, seq_len: 32, preview_n: 8, "
                      "final_n: 8}\nauto: {profile: dev}\n"
                      f"eval: {{primary_metric: {{ratio_limit: {value}}}}}\n")
    code, report, _ = invoke("doctor", "-c", str(preset), "--json")
    errors = [f for f in report["findings"] if f["severity"] == "ERROR"]
    if value == "1.10":  # the same preset with a finite limit is clean
        assert code == 0 and errors == []
        return
    assert code == 2
    assert [f for f in errors if "ratio_limit" in f["message"]]


def test_json_output_never_holds_nan(monkeypatch):
    from click.testing import CliRunner

    from invarlock import doctor
    from invarlock.cli import main

    class Result:
        exit_code = 0

        def as_dict(self):
            return {"free_memory_fraction": float("nan"), "limit": float("inf")}

    monkeypatch.setattr(doctor, "diagnose", lambda **kwargs: Result())
    out = CliRunner().invoke(main, ["doctor", "--json"]).stdout
    parsed = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert parsed == {"free_memory_fraction": None, "limit": None}
