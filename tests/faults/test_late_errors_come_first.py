"""Inputs that used to fail late (after evaluation), inside (a traceback, MemoryError) or never
(a hang) are input errors: exit 2, one line naming the input, nothing evaluated or written.

Each family is tried in several shapes, since the check must hold for the family, not for
one example.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from invarlock import evaluate
from tests.faults.conftest import certify, error_lines, invoke

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_evaluation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was evaluated before the bad input was reported")

    monkeypatch.setattr(evaluate, "evaluate_windows", refuse)


def _refused(result: tuple[int, dict | None, str], *words: str) -> str:
    code, payload, stderr = result
    assert code == 2, (code, payload)
    assert payload is not None and payload["exit_code"] == 2
    assert len(error_lines(stderr)) == 1 and "internal error" not in stderr
    for word in words:
        assert word in payload["error"], payload["error"]
    return payload["error"]


# --- numbers in presets ----------------------------------------------------------------------

@pytest.mark.parametrize(("preset", "key"), [
    ("guards: {spectral: {deadband: '1e999'}}", "guards.spectral.deadband"),
    ("guards: {spectral: {deadband: '-1e999'}}", "guards.spectral.deadband"),
    ("guards: {spectral: {deadband: '-0.1'}}", "guards.spectral.deadband"),
    ("guards: {rmt: {null_z: '-1'}}", "guards.rmt.null_z"),
    ("guards: {rmt: {null_z: 'nan'}}", "guards.rmt.null_z"),
    ("guards: {rmt: {null_z: '.inf'}}", "guards.rmt.null_z"),
    ("guards: {spectral: {sigma_quantile: '1.5'}}", "guards.spectral.sigma_quantile"),
    ("guards: {spectral: {max_spectral_norm: '-3'}}", "guards.spectral.max_spectral_norm"),
    ("guards: {variance: {discovery: {deadband: '2'}}}", "guards.variance.discovery.deadband"),
    ("guards: {rmt: {epsilon_by_family: {ffn: '-0.2'}}}", "guards.rmt.epsilon_by_family.ffn"),
])
def test_quoted_numbers_meet_the_same_range_checks_as_numbers(
        preset, key, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(preset + "\n")
    _refused(certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "o", sonnets_path, fast_preset,
                     "--preset", str(bad)), key)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [
    ("--seed", str(2**32)), ("--seed", str(2**64)),
    ("--preset", "dataset: {seed: 99999999999999}"),
    ("--preset", "eval: {bootstrap: {seed: 18446744073709551616}}"),
    ("--preset", "eval: {bootstrap: {seed: -1}}"),
])
def test_a_seed_out_of_range_is_an_input_error(extra, no_evaluation, tiny_gpt2_dir,
                                                 sonnets_path, fast_preset, tmp_path):
    flag, value = extra
    if flag == "--preset":
        (tmp_path / "seed.yaml").write_text(value + "\n")
        value = str(tmp_path / "seed.yaml")
    _refused(certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "o", sonnets_path, fast_preset,
                     flag, value), "seed")


# --- config files that are too deep, too big, or expand without end --------------------------

def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "guards:\n  spectral:\n    scope: all\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [
    "[" * 50_000 + "]" * 50_000,                                 # RecursionError in the parser
    "guards: " + "{a: " * 40 + "1" + "}" * 40,                    # deep but parseable
    _alias_bomb(),                                               # a billion laughs
    "eval: {x: &x [1, 2]}\n" + "".join(f"k{i}: &k{i} [*{'x' if i == 0 else f'k{i - 1}'}, "
                                        f"*{'x' if i == 0 else f'k{i - 1}'}]\n"
                                        for i in range(40)),     # doubling 40 times
])
def test_deep_or_exploding_yaml_is_one_line_and_bounded(text, no_evaluation, tiny_gpt2_dir,
                                                         sonnets_path, fast_preset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    _refused(certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "o", sonnets_path, fast_preset,
                     "--preset", str(bad)), "bad.yaml")


def test_an_oversized_preset_is_refused_unread(no_evaluation, tiny_gpt2_dir, sonnets_path,
                                               fast_preset, tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(3 * 2**30)  # sparse: 3 GiB of NUL that takes no disk
    _refused(certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "o", sonnets_path, fast_preset,
                     "--preset", str(big)), "more than")


# --- FIFOs and other non-files where a file is read --------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a child process: a read that blocks on a FIFO cannot stall the test run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "invarlock", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("where", ["certificate", "run folder certificate", "preset",
                                   "dataset", "subject config"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(
        where, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    fifo = tmp_path / "fifo"
    if where == "certificate":
        os.mkfifo(fifo)
        done = _cli("verify", str(fifo))
    elif where == "run folder certificate":
        (tmp_path / "run").mkdir()
        os.mkfifo(tmp_path / "run" / "evaluation.cert.json")
        done = _cli("report", str(tmp_path / "run"), "--format", "md")
    else:
        subject = tmp_path / "subject"
        shutil.copytree(tiny_gpt2_dir, subject)
        preset, dataset = fast_preset, sonnets_path
        if where == "preset":
            preset = tmp_path / "preset.yaml"
            os.mkfifo(preset)
        elif where == "dataset":
            dataset = tmp_path / "data.txt"
            os.mkfifo(dataset)
        else:
            (subject / "config.json").unlink()
            os.mkfifo(subject / "config.json")
        done = _cli("certify", "--baseline", str(tiny_gpt2_dir), "--subject", str(subject),
                    "--dataset", str(dataset), "--profile", "dev", "--preset", str(preset),
                    "--out", str(tmp_path / "o"), "--no-cache")
    said = done.stdout + done.stderr
    assert done.returncode == 2, said
    assert "Traceback" not in said
    assert "not a regular file" in said or (where == "subject config"
                                            and "has no config.json" in said), said


# --- datasets that are not text ----------------------------------------------------------------

@pytest.mark.parametrize("shape", ["sparse 3 GiB .txt", "sparse 3 GiB .jsonl",
                                   "binary .txt", "text head, 3 GiB", "binary in a folder"])
def test_a_binary_or_huge_dataset_is_refused_without_reading_it_whole(
        shape, no_evaluation, tiny_gpt2_dir, fast_preset, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    name = "data.jsonl" if "jsonl" in shape else "data.txt"
    path = folder / name
    with open(path, "wb") as fh:
        if shape == "binary .txt" or shape == "binary in a folder":
            fh.write(bytes(range(256)) * 64)
        elif shape == "text head, 3 GiB":
            fh.write(b"Shall I compare thee to a summer's day?\n" * 1000)
            fh.truncate(3 * 2**30)
        else:
            fh.truncate(3 * 2**30)
    spec = folder if shape == "binary in a folder" else path
    error = _refused(certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "o", spec, fast_preset))
    assert "binary" in error or "more than" in error
    assert not (tmp_path / "o").exists()


# --- folders a run would write into ------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--save-subject", "--write-ve-subject"])
@pytest.mark.parametrize("content", ["a file", "a hidden file", "a sub-folder"])
def test_a_non_empty_save_folder_is_refused_before_evaluation(
        flag, content, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    {"a file": lambda: (target / "keep.txt").write_text("mine"),
     "a hidden file": lambda: (target / ".keep").write_text("mine"),
     "a sub-folder": lambda: (target / "sub").mkdir()}[content]()
    models = (["--edit", "quant_rtn"] if flag == "--save-subject"
              else ["--subject", str(tiny_gpt2_dir)])
    result = invoke("certify", "--baseline", str(tiny_gpt2_dir), *models,
                    "--dataset", str(sonnets_path), "--profile", "dev",
                    "--preset", str(fast_preset), "--out", str(tmp_path / "o"), "--json",
                    flag, str(target))
    _refused(result, flag, "not empty")
    assert not (tmp_path / "o").exists()


def test_one_folder_for_both_copies_is_refused(no_evaluation, tiny_gpt2_dir, sonnets_path,
                                               fast_preset, tmp_path):
    result = invoke("certify", "--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                    "--dataset", str(sonnets_path), "--profile", "dev",
                    "--preset", str(fast_preset), "--out", str(tmp_path / "o"), "--json",
                    "--save-subject", str(tmp_path / "copy"),
                    "--write-ve-subject", str(tmp_path / "." / "copy"))
    _refused(result, "same folder")


# --- checkpoint metadata of the wrong shape ----------------------------------------------------

def _subject_with(tiny: Path, tmp_path: Path, edit) -> Path:
    subject = tmp_path / "subject"
    shutil.copytree(tiny, subject)
    edit(subject)
    return subject


def _config_with(**fields):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("qc", ["int8", ["bitsandbytes"], 8, True,
                                {"bits": 8}, {"quant_method": 5},
                                {"quant_method": ["gptq"]}, {"quant_method": {"a": 1}},
                                {"quant_method": "  "}])
def test_malformed_quantization_config_is_an_input_error(
        qc, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    subject = _subject_with(tiny_gpt2_dir, tmp_path, _config_with(quantization_config=qc))
    _refused(certify(tiny_gpt2_dir, subject, tmp_path / "o", sonnets_path, fast_preset),
             "quant")


def _sharded(index: str):
    def edit(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(index)
    return edit


@pytest.mark.parametrize("index", [
    "[]", '{"weight_map": []}', '{"weight_map": {}}', '{"weight_map": {"a": 5}}',
    '{"weight_map": {"a": ["x"]}}', '{"metadata": {}}', '"weight_map"',
    '{"weight_map": {"a": "../model-00001-of-00001.safetensors"}}',
    '{"weight_map": {"a": "/etc/hostname"}}',
    '{"weight_map": ' * 30_000 + "{}" + "}" * 30_000,
])
def test_malformed_shard_index_is_an_input_error(index, no_evaluation, tiny_gpt2_dir,
                                                  sonnets_path, fast_preset, tmp_path):
    subject = _subject_with(tiny_gpt2_dir, tmp_path, _sharded(index))
    _refused(certify(tiny_gpt2_dir, subject, tmp_path / "o", sonnets_path, fast_preset),
             "model.safetensors.index.json")


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a": ' * 100_000 + "1" + "}" * 100_000])
def test_deeply_nested_model_config_is_an_input_error(text, no_evaluation, tiny_gpt2_dir,
                                                      sonnets_path, fast_preset, tmp_path):
    subject = _subject_with(tiny_gpt2_dir, tmp_path,
                            lambda f: (f / "config.json").write_text(text))
    _refused(certify(tiny_gpt2_dir, subject, tmp_path / "o", sonnets_path, fast_preset),
             "config.json")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64,
                                     b"not a gguf file at all" * 10, bytes(range(256)) * 16])
def test_malformed_gguf_is_an_input_error(content, no_evaluation, tiny_gpt2_dir, sonnets_path,
                                          fast_preset, tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(content)
    _refused(certify(tiny_gpt2_dir, folder / "model.gguf", tmp_path / "o", sonnets_path,
                     fast_preset), "model.gguf")


# --- settings that do nothing in the given combination -----------------------------------------

@pytest.mark.parametrize(("extra", "words"), [
    (("--max-memory", "cpu=1GB"), "--device-map"),
    (("--no-cache", "--cache-dir", "CACHE"), "--no-cache"),
    (("--text-field", "body"), "dataset.text_field"),
    (("--label-field", "y"), "dataset.label_field"),
    (("--dequantize",), "--dequantize"),
    (("--gguf-file", "model.gguf"), "--gguf-file"),
])
def test_a_flag_that_does_nothing_is_refused_with_why(
        extra, words, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    args = [a.replace("CACHE", str(tmp_path / "cache")) for a in extra]
    error = _refused(certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "o", sonnets_path,
                             fast_preset, *args), words)
    assert "does nothing" in error


@pytest.mark.parametrize(("preset", "words"), [
    ("{dataset: {path: DATA}, output: {cache: false, cache_dir: CACHE}}", "--no-cache"),
    ("dataset: {provider: text, path: DATA, split: train}", "dataset.split"),
    ("dataset: {path: DATA, name: wikitext}", "dataset.name"),
    ("dataset: {provider: text, path: DATA, config: raw}", "dataset.config"),
    ("dataset: {provider: text, path: DATA, text_field: body}", "dataset.text_field"),
    ("dataset: {provider: demo, label_field: y}", "dataset.label_field"),
])
def test_a_preset_setting_that_does_nothing_is_refused_with_why(
        preset, words, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    text = preset.replace("CACHE", str(tmp_path / "cache")).replace("DATA", str(sonnets_path))
    (tmp_path / "p.yaml").write_text(text + "\n")
    result = invoke("certify", "--baseline", str(tiny_gpt2_dir), "--subject",
                    str(tiny_gpt2_dir), "--profile", "dev", "--preset", str(fast_preset),
                    "--preset", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "o"),
                    "--json")
    assert "does nothing" in _refused(result, words)


# --- a subject folder named like the index ---------------------------------------------------

@pytest.mark.parametrize("name", ["index.json", "INDEX.md"])
def test_a_subject_folder_named_like_the_index_gets_its_own_folder(
        name, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    odd = tmp_path / "models" / name
    shutil.copytree(tiny_gpt2_dir, odd)
    code, payload, _ = invoke("certify", "--baseline", str(tiny_gpt2_dir),
                              "--subject", str(tiny_gpt2_dir), "--subject", str(odd),
                              "--dataset", str(sonnets_path), "--profile", "dev",
                              "--preset", str(fast_preset), "--out", str(tmp_path / "o"),
                              "--no-cache", "--json")
    assert code == 0, payload
    index = tmp_path / "o" / "index.json"
    assert index.is_file()
    rows = json.loads(index.read_text())["subjects"]
    assert len(rows) == 2 and all((tmp_path / "o" / row["name"]).is_dir() for row in rows)
    assert not {row["name"].lower() for row in rows} & {"index.json", "index.md"}


@pytest.mark.parametrize("rows", ["5", "[5]", '[{"certificate": 7}]', '[["a", "b"]]',
                                  '[{"name": "a", "subject": "s", "certificate": ["x"]}]',
                                  '[{"name": 1, "subject": "s"}]', '[null]'])
def test_an_index_of_the_wrong_shape_is_one_line(rows, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text(
        f'{{"format": "invarlock.index", "version": 1, "subjects": {rows}}}')
    code, payload, stderr = invoke("verify", str(out), "--json")
    assert code == 2 and "internal error" not in stderr, (payload, stderr)
    assert "Traceback" not in stderr
    assert "index" in json.dumps(payload)  # the index is named as what is wrong
