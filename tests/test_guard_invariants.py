"""Invariants guard: config, structure, tying, finiteness, fingerprint and logits."""

from __future__ import annotations

import pytest

from invarlock.guards import invariants


def _pre(**changes) -> dict:
    pre = {"parameters": 10, "config_differences": [], "missing_in_subject": [],
           "unexpected_in_subject": [], "shape_mismatches": [],
           "tying": {"baseline": [["lm_head.weight", "wte.weight"]],
                     "subject": [["wte.weight", "lm_head.weight"]]},
           "nonfinite_baseline": [], "nonfinite_subject": [],
           "tokenizer": {"baseline": "sha256:a", "subject": "sha256:a"}}
    pre.update(changes)
    return pre


POST = {"fingerprint_before": "sha256:x", "fingerprint_after": "sha256:x",
        "nonfinite_windows": 0}


def test_config_differences_ignore_dtype_and_quantization():
    base = {"n_layer": 2, "torch_dtype": "float32", "architectures": ["GPT2LMHeadModel"]}
    subj = {"n_layer": 2, "torch_dtype": "bfloat16", "quantization_config": {"bits": 8},
            "architectures": ["GPT2LMHeadModel"]}
    assert invariants.config_differences(base, subj) == []
    assert invariants.config_differences(base, {**subj, "n_layer": 3}) == [
        {"key": "n_layer", "baseline": 2, "subject": 3}]


def test_intact_model_passes_and_tying_order_does_not_matter():
    d = invariants.decide({"pre": _pre(), "post": POST}, {})
    assert d.passed and "before and after" in d.reason


@pytest.mark.parametrize(("change", "words"), [
    ({"config_differences": [{"key": "n_head", "baseline": 2, "subject": 4}]}, "n_head"),
    ({"missing_in_subject": ["h.1.attn.bias"]}, "missing"),
    ({"shape_mismatches": [{"name": "wte.weight", "baseline": [5, 2], "subject": [6, 2]}]},
     "wte.weight"),
    ({"tying": {"baseline": [["a", "b"]], "subject": []}}, "tying"),
    ({"nonfinite_subject": [{"parameter": "h.0.mlp.c_fc.weight", "module": "h.0.mlp.c_fc",
                             "family": "ffn", "count": 1}]}, "h.0.mlp.c_fc"),
    ({"tokenizer": {"baseline": "sha256:a", "subject": "sha256:b"}}, "tokenizers"),
])
def test_each_breach_fails_and_is_named(change, words):
    d = invariants.decide({"pre": _pre(**change), "post": POST}, {})
    assert not d.passed and words in d.reason
    # the pre-evaluation check alone (no post phase yet) fails too: the chain stops there
    assert not invariants.decide({"pre": _pre(**change), "post": None}, {}).passed


def test_post_breaches():
    changed = {**POST, "fingerprint_after": "sha256:y"}
    assert "changed during certification" in invariants.decide(
        {"pre": _pre(), "post": changed}, {}).reason
    broken = {**POST, "nonfinite_windows": 3}
    assert "non-finite logits in 3" in invariants.decide({"pre": _pre(), "post": broken},
                                                         {}).reason
