"""Several --subject in one run: the baseline is evaluated once, one certificate per subject,
an index, the worst verdict as exit code, and `verify` of the whole folder."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from click.testing import CliRunner

from invarlock.cli import main
from invarlock.models import loading
from invarlock.subjects import folder_names
from tests.test_certify_cli import FAST, _scaled_copy
from tests.test_models_device_map import _int8_subject


@pytest.fixture
def counted(monkeypatch):
    """Count, per checkpoint path, how often it is loaded and how many forward passes it runs
    on full windows (the short probe pass of chunked scoring is not an evaluation)."""
    loads: Counter = Counter()
    forwards: Counter = Counter()
    real = loading.load_model

    def load_model(source, **kwargs):
        loaded = real(source, **kwargs)
        key = str(source.path)
        loads[key] += 1

        def hook(_module, _args, kw):
            if kw["input_ids"].shape[1] > 8:
                forwards[key] += 1

        loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        return loaded

    monkeypatch.setattr(loading, "load_model", load_model)
    return loads, forwards


def _certify(tmp_path, baseline, subjects, sonnets, out):
    preset = tmp_path / "fast.yaml"
    preset.write_text(FAST)
    args = ["certify", "--baseline", str(baseline), "--dataset", str(sonnets), "--profile",
            "dev", "--preset", str(preset), "--out", str(out), "--no-cache", "--json"]
    for subject in subjects:
        args += ["--subject", str(subject)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def test_repeated_subject_evaluates_the_baseline_once(tiny_gpt2_dir, sonnets_path, tmp_path,
                                                      counted):
    loads, forwards = counted
    int8 = _int8_subject(tiny_gpt2_dir, tmp_path / "int8")
    broken = _scaled_copy(tiny_gpt2_dir, tmp_path / "broken", 8.0)
    same = shutil.copytree(tiny_gpt2_dir, tmp_path / "same")  # identical weights, own path
    base = str(tiny_gpt2_dir)

    code, _ = _certify(tmp_path, tiny_gpt2_dir, [int8], sonnets_path, tmp_path / "one")
    assert code == 0
    single_loads, single_forwards = loads[base], forwards[base]
    assert single_loads == 1 and single_forwards > 0
    loads.clear()
    forwards.clear()

    code, summary = _certify(tmp_path, tiny_gpt2_dir, [int8, same, broken],
                             sonnets_path, tmp_path / "many")
    # the baseline: loaded and evaluated once, exactly as for one subject
    assert loads[base] == 1 and forwards[base] == single_forwards
    assert loads[str(int8)] == 1 and loads[str(broken)] == 1
    assert forwards[str(int8)] > 0 and forwards[str(broken)] > 0

    assert code == 1  # the worst verdict: the broken subject fails
    assert [row["verdict"] for row in summary["subjects"]] == ["PASS", "PASS", "FAIL"]
    out = tmp_path / "many"
    index = json.loads((out / "index.json").read_text())
    assert [row["name"] for row in index["subjects"]] == ["int8", "same", "broken"]
    assert index["exit_code"] == 1
    for row in index["subjects"]:
        cert = json.loads((out / row["certificate"]).read_text())
        assert cert["verdict"]["status"] == row["verdict"]
        assert cert["subject"]["source"].endswith(row["name"])
        assert (out / row["name"] / "evaluation.cert.md").is_file()
    table = (out / "index.md").read_text()
    assert len([ln for ln in table.splitlines() if ln.startswith("| ")]) == 1 + 3
    assert "| FAIL |" in table
    assert "| 95% [" in table and all(row["alpha"] == 0.05 for row in index["subjects"])

    result = CliRunner().invoke(main, ["verify", str(out), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1  # all verified, one says FAIL
    assert len(report["certificates"]) == 3 and all(c["verified"]
                                                    for c in report["certificates"])

    index["subjects"][2]["verdict"] = "PASS"  # an index that misstates a certificate
    (out / "index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 2 and "index.json: verdict 'PASS'" in result.stdout


def test_edit_and_several_subjects_do_not_mix(tiny_gpt2_dir, sonnets_path, tmp_path):
    result = CliRunner().invoke(main, [
        "certify", "--baseline", str(tiny_gpt2_dir), "--subject", str(tiny_gpt2_dir),
        "--subject", str(tiny_gpt2_dir), "--edit", "quant_rtn", "--dataset",
        str(sonnets_path), "--no-cache"])
    assert result.exit_code == 2
    assert "give either a subject (--subject) or an edit (--edit)" in result.output


def test_bad_second_subject_is_found_before_evaluating(tiny_gpt2_dir, sonnets_path, tmp_path,
                                                       counted):
    loads, forwards = counted
    result = CliRunner().invoke(main, [
        "certify", "--baseline", str(tiny_gpt2_dir), "--subject", str(tiny_gpt2_dir),
        "--subject", str(tmp_path / "missing"), "--dataset", str(sonnets_path), "--no-cache",
        "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert not loads and not forwards  # nothing was loaded or evaluated
    assert not (tmp_path / "o").exists()


def test_folder_names_are_distinct_and_safe():
    assert folder_names(["models/int8", "other/int8", "hf:org/model:v2", "a b/c?d/"]) == [
        "int8", "int8-2", "v2", "c-d"]


def test_folder_names_leave_the_names_of_the_result_files_alone():
    """A subject folder named index.json would stand where the index is written."""
    assert folder_names(["a/index.json", "b/evaluation.cert.json", "index.md"]) == [
        "index.json-2", "evaluation.cert.json-2", "index.md-2"]
