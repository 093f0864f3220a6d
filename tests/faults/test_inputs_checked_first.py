"""Every input is checked before anything is evaluated: exit 2, one line, nothing written."""

from __future__ import annotations

import pytest

from invarlock import evaluate
from tests.faults.conftest import certify, error_lines, invoke


@pytest.fixture
def no_evaluation(monkeypatch):
    """Any model evaluation fails the test: these errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was evaluated before the bad input was reported")

    monkeypatch.setattr(evaluate, "evaluate_windows", refuse)


def _bad_out(tmp_path, case):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {
        "out is a file": a_file,
        "out under a file": a_file / "sub" / "dir",
        "out name too long": tmp_path / ("x" * 300),
    }[case]


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "out name too long"])
def test_unusable_output_folder_is_reported_before_evaluation(
        case, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    out = _bad_out(tmp_path, case)
    code, payload, stderr = certify(tiny_gpt2_dir, tiny_gpt2_dir, out, sonnets_path,
                                    fast_preset)
    assert code == 2 and payload["exit_code"] == 2 and payload["verdict"] == "ERROR"
    assert len(error_lines(stderr)) == 1 and "internal error" not in stderr


def test_output_folder_that_cannot_be_written_is_reported_before_evaluation(
        no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, monkeypatch):
    from invarlock import outdir

    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):  # a read-only filesystem, as root sees it
        if str(file).startswith(str(tmp_path / "ro")) and any(m in mode for m in "wax"):
            raise OSError(30, "Read-only file system")
        return real_open(file, mode, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(outdir, "open", read_only_open, raising=False)
    code, payload, _stderr = certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "ro", sonnets_path,
                                    fast_preset)
    assert code == 2 and "not writable" in payload["error"]
    assert list((tmp_path / "ro").iterdir()) == []


def test_dataset_path_too_long_is_an_input_error(no_evaluation, tiny_gpt2_dir, fast_preset,
                                                 tmp_path):
    code, payload, stderr = certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "o",
                                    tmp_path / ("d" * 5000 + ".txt"), fast_preset)
    assert code == 2 and len(error_lines(stderr)) == 1
    assert len(payload["error"]) < 300  # the path is shortened, not echoed whole
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_preset_with_a_non_finite_number_is_an_input_error(
        value, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text(f"eval: {{primary_metric: {{ratio_limit: {value}}}}}\n")
    code, payload, _stderr = invoke(
        "certify", "--baseline", str(tiny_gpt2_dir), "--subject", str(tiny_gpt2_dir),
        "--dataset", str(sonnets_path), "--profile", "dev", "--preset", str(fast_preset),
        "--preset", str(preset), "--out", str(tmp_path / "o"), "--json")
    assert code == 2
    assert "eval.primary_metric.ratio_limit" in payload["error"]
    assert "finite" in payload["error"]


def test_failed_input_check_leaves_no_output_folder_behind(tiny_gpt2_dir, sonnets_path,
                                                          fast_preset, tmp_path):
    out = tmp_path / "new" / "run"
    code, _payload, _ = certify(tiny_gpt2_dir, tmp_path / "no-such-model", out, sonnets_path,
                               fast_preset)
    assert code == 2
    assert not (tmp_path / "new").exists()
