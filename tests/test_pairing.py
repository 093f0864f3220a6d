"""The pairing check: each model's side hashes the tensors it actually fed to the forward,
and `pairing_acceptable` compares them with the plan, so a run whose models did not see the
planned windows cannot produce a certificate."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from invarlock import evaluate, gate
from invarlock.cli import main
from invarlock.enums import MetricKind
from invarlock.evaluate import evaluate_windows, planned_sha256
from invarlock.models.loading import load_model
from invarlock.models.source import resolve_model_source
from tests.test_evaluate import causal_windows, labelled, mlm_windows  # noqa: F401

FAST = "dataset: {seq_len: 64, preview_n: 8, final_n: 8}\neval: {bootstrap: {replicates: 100}}\n"


def _tampered(windows, row: int = 1):
    """A copy of `windows` whose `row` feeds one different token id (the plan is untouched)."""
    ids = windows.input_ids.copy()
    ids[row, 3] = (ids[row, 3] + 1) % 50
    return dataclasses.replace(windows, input_ids=ids)


@pytest.fixture(scope="module")
def classifier(tiny_classifier_dir):
    return load_model(resolve_model_source(str(tiny_classifier_dir)))


@pytest.mark.parametrize("batch_size", [1, 5, None])
def test_fed_hashes_equal_the_plan_for_a_faithful_evaluation(tiny_gpt2_dir, batch_size):
    model = load_model(resolve_model_source(str(tiny_gpt2_dir))).model
    windows = causal_windows(n=9, seq_len=32, vocab=200)
    scores = evaluate_windows(model, windows, kind=MetricKind.PPL_CAUSAL, device="cpu",
                              batch_size=batch_size)
    assert scores.fed_sha256 == planned_sha256(windows)
    assert len(set(scores.fed_sha256)) == windows.input_ids.shape[0]


def test_fed_hashes_cover_masks_and_labels(tiny_bert_dir, classifier, labelled):  # noqa: F811
    bert = load_model(resolve_model_source(str(tiny_bert_dir)))
    windows = mlm_windows(bert.tokenizer, n=6)
    scores = evaluate_windows(bert.model, windows, kind=MetricKind.PPL_MLM, device="cpu")
    assert scores.fed_sha256 == planned_sha256(windows)
    # Same ids, another label: a different evaluation, so a different hash.
    relabelled = dataclasses.replace(labelled, labels=1 - labelled.labels)
    a = evaluate_windows(classifier.model, labelled, kind=MetricKind.ACCURACY, device="cpu")
    b = evaluate_windows(classifier.model, relabelled, kind=MetricKind.ACCURACY, device="cpu")
    assert a.fed_sha256 == planned_sha256(labelled)
    assert all(x != y for x, y in zip(a.fed_sha256, b.fed_sha256, strict=True))


def test_a_tampered_feed_breaks_the_match(tiny_gpt2_dir):
    model = load_model(resolve_model_source(str(tiny_gpt2_dir))).model
    windows = causal_windows(n=8, seq_len=32, vocab=200)
    planned = planned_sha256(windows)
    honest = evaluate_windows(model, windows, kind=MetricKind.PPL_CAUSAL, device="cpu")
    tampered = evaluate_windows(model, _tampered(windows, row=5), kind=MetricKind.PPL_CAUSAL,
                                device="cpu")
    assert [i for i, (p, f) in enumerate(zip(planned, tampered.fed_sha256, strict=True))
            if p != f] == [5]
    assert gate.pairing_match(planned, honest.fed_sha256, honest.fed_sha256) == 1.0
    assert gate.pairing_match(planned, honest.fed_sha256, tampered.fed_sha256) == 7 / 8
    assert gate.pairing_match(planned, tampered.fed_sha256, honest.fed_sha256) == 7 / 8
    assert gate.pairing_match(planned, honest.fed_sha256, honest.fed_sha256[:7]) < 1.0
    assert not gate.pairing_check(7 / 8, 0.0, 8, 8).passed


def _certify(args: list[str]) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["certify", *args, "--no-cache", "--json"],
                                catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tampered_call", [1, 3])  # baseline preview, subject preview
def test_certify_stops_when_a_model_was_fed_other_ids(tiny_gpt2_dir, sonnets_path, tmp_path,
                                                      monkeypatch, tampered_call):
    real = evaluate.evaluate_windows
    calls = []

    def feed(model, windows, **kwargs):
        calls.append(windows.name)
        if len(calls) == tampered_call:
            windows = _tampered(windows)
        return real(model, windows, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_windows", feed)
    preset = tmp_path / "fast.yaml"
    preset.write_text(FAST)
    code, payload = _certify(["--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                              "--dataset", str(sonnets_path), "--profile", "dev", "--preset",
                              str(preset), "--out", str(tmp_path / "o")])
    assert code == 3 and "pairing broken" in payload["error"]
    assert "fed to both models exactly as planned" in payload["error"]
    assert not (tmp_path / "o" / "evaluation.cert.json").exists()


def test_invariants_receive_the_subjects_own_tokenizer_hash(tiny_gpt2_dir, sonnets_path,
                                                           tmp_path, monkeypatch):
    """The pair handed to the invariants guard is (baseline's, subject's), each from its own
    tokenizer: a str subclass remembers which tokenizer a hash came from."""
    from invarlock.guards.measure import probe
    from invarlock.models import tokenizer

    class Tagged(str):
        source: str

    real_hash = tokenizer.tokenizer_hash

    def tagged(tok):
        value = Tagged(real_hash(tok))
        value.source = str(tok.name_or_path)
        return value

    seen = []
    real_ctx = probe.SubjectContext

    def capture(**kwargs):
        seen.append(kwargs["tokenizer_hashes"])
        return real_ctx(**kwargs)

    monkeypatch.setattr(tokenizer, "tokenizer_hash", tagged)
    monkeypatch.setattr(probe, "SubjectContext", capture)
    subject = tmp_path / "subject"
    import shutil

    shutil.copytree(tiny_gpt2_dir, subject)
    # a setting that does not change the ids, so that its tokenizer is loaded, not shared
    config = subject / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 99}))
    preset = tmp_path / "fast.yaml"
    preset.write_text(FAST)
    code, _ = _certify(["--baseline", str(tiny_gpt2_dir), "--subject", str(subject),
                        "--dataset", str(sonnets_path), "--profile", "dev", "--preset",
                        str(preset), "--out", str(tmp_path / "o")])
    assert code == 0
    (base_hash, subj_hash), = seen
    assert base_hash == subj_hash
    assert base_hash.source == str(tiny_gpt2_dir) and subj_hash.source == str(subject)
