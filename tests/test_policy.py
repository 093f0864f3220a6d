"""Tests for invarlock.policy and invarlock.config: tiers, profiles, overrides, validation."""

from __future__ import annotations

import pytest

from invarlock import config as cfg
from invarlock import policy
from invarlock.errors import ConfigError


def test_shipped_tiers_and_profiles():
    assert {t: policy.tiers()[t]["primary_metric"]["ratio_limit"] for t in policy.TIERS} == {
        "balanced": 1.10, "conservative": 1.05, "aggressive": 1.20}
    ci, release = policy.profiles()["ci"], policy.profiles()["release"]
    assert (ci["windows"]["preview_n"], ci["bootstrap"]["replicates"]) == (200, 1200)
    assert (release["windows"]["preview_n"], release["bootstrap"]["replicates"]) == (400, 3200)


def test_defaults_are_balanced_ci_and_digest_is_stable():
    a, b = policy.resolve({}), policy.resolve({})
    assert (a.tier, a.profile) == ("balanced", "ci")
    assert a.digest == b.digest and a.digest.startswith("sha256:")
    assert a.overrides == ()
    assert a.windows.stride == a.windows.seq_len


def test_overrides_are_recorded_and_change_the_digest():
    base = policy.resolve({})
    changed = policy.resolve({"dataset": {"seq_len": 128},
                              "eval": {"primary_metric": {"ratio_limit": 1.2}}})
    assert changed.overrides == ("primary_metric.ratio_limit", "windows.seq_len")
    assert changed.digest != base.digest
    assert changed.primary_metric.ratio_limit == 1.2
    same = policy.resolve({"dataset": {"seq_len": 512}})  # equal to the profile default
    assert same.overrides == ()


def test_profile_seq_len_is_shortened_to_context_but_explicit_one_is_an_error():
    assert policy.resolve({}, context_length=256).windows.seq_len == 256
    with pytest.raises(ConfigError, match="exceeds the model's context length"):
        policy.resolve({"dataset": {"seq_len": 1024}}, context_length=256)


@pytest.mark.parametrize(("config", "message"), [
    ({"dataset": {"seq_len": 128, "stride": 64}}, "windows would overlap"),
    ({"dataset": {"preview_n": 10, "final_n": 20}}, "must be equal"),
    ({"eval": {"primary_metric": {"drift_band": [1.01, 1.05]}}}, "bracket 1.0"),
    ({"auto": {"tier": "lenient"}}, "unknown tier"),
])
def test_invalid_policy_values(config, message):
    with pytest.raises(ConfigError, match=message):
        policy.resolve(config)


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'dataset.seqlen'; did you mean 'seq_len'"):
        cfg.validate({"dataset": {"seqlen": 128}}, "preset.yaml")


def test_wrong_type_and_enum_name_the_key():
    with pytest.raises(ConfigError, match=r"dataset.preview_n must be integer, got 'many'"):
        cfg.validate({"dataset": {"preview_n": "many"}})
    with pytest.raises(ConfigError, match=r"auto.tier must be one of"):
        cfg.validate({"auto": {"tier": "lenient"}})


def test_seed_minimal_config_shape_is_accepted():
    seed_config = {
        "model": {"id": "gpt2", "adapter": "hf_gpt2", "device": "cpu"},
        "dataset": {"provider": "wikitext2", "split": "validation", "seq_len": 512,
                    "stride": 512, "preview_n": 64, "final_n": 64, "seed": 42},
        "edit": {"name": "quant_rtn", "plan": {"bitwidth": 8, "per_channel": True,
                                                "scope": "attn"}},
        "eval": {"metric": {"kind": "ppl_causal"}, "loss": {"type": "causal"}},
        "auto": {"enabled": True, "tier": "balanced", "probes": 0},
        "output": {"dir": "runs", "save_model": False, "save_report": True},
    }
    cfg.validate(seed_config)


def test_merge_order_later_sources_win(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("dataset: {seq_len: 128, preview_n: 32, final_n: 32}\n")
    second = tmp_path / "b.yaml"
    second.write_text("dataset: {seq_len: 64}\n")
    merged = cfg.merge_sources([("a", cfg.load_yaml(first)), ("b", cfg.load_yaml(second))])
    assert merged["dataset"] == {"seq_len": 64, "preview_n": 32, "final_n": 32}


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {seq_len: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .* at line \d+, column \d+"):
        cfg.load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        cfg.load_yaml(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        cfg.load_yaml(listing)
