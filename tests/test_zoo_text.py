"""Text calibration of the zoo's data-aware families (GPTQ, Wanda, AWQ-style scales): the
held-out windows are text no evaluation window contains, and they reach every such edit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _request(baseline, dataset, tmp_path, preview=6, final=6):
    from invarlock.run_config import config_from_certify_flags, request_from_config

    preset = tmp_path / "windows.yaml"
    preset.write_text(f"dataset: {{preview_n: {preview}, final_n: {final}, seq_len: 32, "
                      "stride: 32}\nauto: {allow_underpowered: true}\n")
    config = config_from_certify_flags({
        "baseline": str(baseline), "dataset_spec": str(dataset), "tier": "balanced",
        "profile": "dev", "presets": (preset,), "edit_name": "quant_rtn"})
    return request_from_config(config)


def _text(tokenizer_dir, path, n=12, length=32):
    """Consecutive `length`-token windows of a text file: real text for a tiny model."""
    from transformers import AutoTokenizer

    from invarlock.calibration.zoo_base import CalibrationText

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(path.read_text())["input_ids"]
    rows = torch.tensor(ids[: n * length]).reshape(n, length)
    return CalibrationText(rows)


def test_held_out_windows_are_corpus_text_no_evaluation_window_contains(
        tiny_llama_dir, sonnets_path, tmp_path):
    """The pool is the plan's next windows in its seeded order: disjoint from preview and
    final, cut to the same length, the same on every call."""
    from invarlock.calibration.zoo_run import _planned, held_out_text
    from invarlock.data.windows import window_sha256

    base = _request(tiny_llama_dir, sonnets_path, tmp_path)
    text = held_out_text(base, pool=16)
    with _planned(base) as (_, plan):
        scored = set(plan.windows.preview.sha256) | set(plan.windows.final.sha256)
        available = plan.windows.available
    assert text.windows.shape == (min(16, available - 12), 32)
    held = {window_sha256(row.numpy()) for row in text.windows}
    assert len(held) == text.windows.shape[0]          # distinct windows
    assert not held & scored
    assert torch.equal(held_out_text(base, pool=16).windows, text.windows)


def test_a_corpus_with_no_window_to_spare_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    from invarlock.calibration.zoo_base import NotApplicable
    from invarlock.calibration.zoo_run import held_out_text

    corpus = tmp_path / "short.txt"
    corpus.write_text(" ".join(f"word{i}" for i in range(200)))
    with pytest.raises(NotApplicable, match="no window beyond"):
        held_out_text(_request(tiny_llama_dir, corpus, tmp_path, preview=100, final=100))


def test_draw_is_seeded_whole_windows_without_repeats_while_the_pool_lasts():
    from invarlock.calibration.zoo_base import CalibrationText

    text = CalibrationText(torch.arange(10 * 8).reshape(10, 8))
    a = text.draw(torch.Generator().manual_seed(1), 6)
    assert a.shape == (6, 8)
    assert torch.equal(a, text.draw(torch.Generator().manual_seed(1), 6))
    assert not torch.equal(a, text.draw(torch.Generator().manual_seed(2), 6))
    assert all(int(r[0]) % 8 == 0 and torch.equal(r, r[0] + torch.arange(8)) for r in a)
    assert len({int(r[0]) for r in a}) == 6
    assert len({int(r[0]) for r in text.draw(torch.Generator().manual_seed(1), 14)}) == 10


@pytest.mark.parametrize("family", ["gptq4", "wanda", "awq_scale", "awq_rtn4", "vo_scale",
                                    "updown_scale"])
def test_every_data_aware_family_edits_from_the_text_it_is_given(tiny_llama_dir,
                                                                 bpe_tokenizer_dir,
                                                                 sonnets_path, family):
    """With text the edit differs from the random-token edit of the same seed, is the same
    for the same text, and its plan says what it calibrated on."""
    from invarlock.calibration.zoo import DATA_AWARE, zoo_edit
    from invarlock.calibration.zoo_base import TEXT_WINDOWS

    assert family in DATA_AWARE
    text = _text(bpe_tokenizer_dir, sonnets_path)

    def edited(calibration_text):
        model = _load(tiny_llama_dir)
        result = zoo_edit(family, calibration_text=calibration_text).apply(model, {"seed": 2})
        return result, {n: p.detach().clone() for n, p in model.named_parameters()}

    with_text, weights = edited(text)
    _, weights_again = edited(text)
    without, random_weights = edited(None)
    assert all(torch.equal(weights[n], weights_again[n]) for n in weights)
    assert any(not torch.equal(weights[n], random_weights[n]) for n in weights)
    assert with_text.plan["calibration"] == "held-out windows"
    assert with_text.plan["calibration_tokens"] == TEXT_WINDOWS * 32  # whole windows
    assert "calibration" not in without.plan


def test_gptq_calibrated_on_text_has_the_smaller_output_error_on_that_text(tiny_llama_dir,
                                                                         bpe_tokenizer_dir,
                                                                         sonnets_path):
    """What text calibration is for: on the text's own layer inputs, GPTQ fitted to them
    moves the outputs less, in total, than GPTQ fitted to random tokens."""
    from invarlock.calibration import zoo
    from invarlock.calibration.zoo_base import _rng, block_matrices, calibration_ids, input_grams
    from invarlock.calibration.zoo_gptq import output_error

    text = _text(bpe_tokenizer_dir, sonnets_path)
    errors = {}
    for name, source in (("text", text), ("random", None)):
        model = _load(tiny_llama_dir)
        blocks = block_matrices(model)
        with torch.no_grad():
            original = [b.rows().detach().float().clone() for b in blocks]
            ids = calibration_ids(model, _rng(0, 17), text)
            grams = input_grams(model, blocks, ids)  # the layer inputs on the text
            zoo.BENIGN["gptq4"](model, 0, text=source)
        errors[name] = sum(output_error(w, b.rows().float(), h)
                           for w, b, h in zip(original, blocks, grams, strict=True))
    assert errors["text"] < errors["random"]


def test_gptq_sigma_script_reports_both_sigmas_for_every_method(tiny_llama_dir, sonnets_path,
                                                                monkeypatch, capsys):
    """The diagnostic that compares weight-space σ with σ along the data: one row per
    module, method and width, and the 8-bit rounding moves the output less than 4-bit; an
    unknown module is refused (exit 2) before any text is planned."""
    import runpy
    from pathlib import Path

    script = str(Path(__file__).resolve().parent.parent / "scripts" / "gptq_sigma.py")
    name = "model.layers.0.mlp.down_proj"

    def run(*modules):
        monkeypatch.setattr("sys.argv", ["gptq_sigma.py", "--baseline", str(tiny_llama_dir),
                                         "--dataset", str(sonnets_path), "--windows", "6",
                                         *modules])
        runpy.run_path(script, run_name="__main__")

    run(name)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(f"| {name} ")]
    assert [r[1].strip() for r in rows] == ["8-bit GPTQ", "8-bit RTN", "4-bit GPTQ", "4-bit RTN"]
    error = {r[1].strip(): float(r[5]) for r in rows}
    assert error["8-bit GPTQ"] < error["4-bit GPTQ"] and error["8-bit RTN"] < error["4-bit RTN"]
    assert error["4-bit GPTQ"] < error["4-bit RTN"]
    with pytest.raises(SystemExit) as exc:
        run("no.such.module")
    assert exc.value.code == 2
    assert "no block matrix named no.such.module" in capsys.readouterr().err


def test_zoo_rows_name_the_calibration_source_of_data_aware_families_only():
    """A data-aware family's row says what it calibrated on (plans recorded before text
    calibration existed mean random tokens); other families read no calibration input."""
    from invarlock.calibration.zoo_run import calibration_source

    def cert(**plan):
        return {"edit": {"plan": {"seed": 0, **plan}}}

    assert calibration_source("gptq4", cert(calibration="held-out windows",
                                            calibration_tokens=4096)) == "held-out windows"
    assert calibration_source("gptq4", cert(calibration_tokens=1024)) == "random tokens"
    assert calibration_source("vo_scale", cert(alpha=0.4)) == "random tokens"
    assert calibration_source("prune", cert(sparsity=0.1)) is None
