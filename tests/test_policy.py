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
                              "eval": {"primary_metric": {"ratio_limit": 1.05}}})
    assert changed.overrides == ("primary_metric.ratio_limit", "windows.seq_len")
    assert changed.digest != base.digest
    assert changed.primary_metric.ratio_limit == 1.05
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


# --- evidence floors ------------------------------------------------------------------------

@pytest.mark.parametrize(("profile", "config", "shortfall"), [
    ("ci", {"dataset": {"preview_n": 50, "final_n": 50}}, "preview_n 50 < 200, final_n 50 < 200"),
    ("ci", {"eval": {"bootstrap": {"replicates": 500}}}, "bootstrap replicates 500 < 1200"),
    ("release", {"dataset": {"preview_n": 200, "final_n": 200}}, "final_n 200 < 400"),
    ("release", {"eval": {"bootstrap": {"replicates": 1200}}}, "replicates 1200 < 3200"),
])
def test_ci_and_release_refuse_overrides_below_their_floor(profile, config, shortfall):
    config = {**config, "auto": {"profile": profile}}
    with pytest.raises(ConfigError, match=f"below the {profile} profile's evidence floor") as exc:
        policy.resolve(config)
    assert shortfall in str(exc.value) and "--allow-underpowered" in str(exc.value)
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)
    allowed = policy.resolve({**config, "auto": {"profile": profile, "allow_underpowered": True}})
    assert allowed.allow_underpowered and allowed.profile == profile


@pytest.mark.parametrize(("profile", "config", "shortfall"), [
    ("release", {"eval": {"bootstrap": {"alpha": 0.45}}},
     "bootstrap.alpha 0.45 > 0.05 (a 55% interval, the profile promises 95%)"),
    ("release", {"guards": {"calibration_windows": 2}}, "guards.calibration_windows 2 < 64"),
    ("ci", {"eval": {"primary_metric": {"ratio_limit": 1.2}}},
     "primary_metric.ratio_limit 1.2 > 1.1"),
    ("ci", {"eval": {"primary_metric": {"accuracy_delta_min_pp": -3.0}}},
     "primary_metric.accuracy_delta_min_pp -3 < -1"),
    ("ci", {"eval": {"primary_metric": {"drift_band": [0.5, 2.0]}}},
     "primary_metric.drift_band [0.5, 2] wider than [0.95, 1.05]"),
    ("ci", {"guards": {"spectral": {"family_caps": {"ffn": 9.0}}}},
     "guards.spectral.family_caps.ffn 9 > 2.5"),
    ("ci", {"guards": {"spectral": {"module_change_limit": None}}},
     "guards.spectral.module_change_limit none > 0.08"),
    ("ci", {"guards": {"spectral": {"edit_along_data_limit": None}}},
     "guards.spectral.edit_along_data_limit none > 0.26"),
    ("release", {"guards": {"spectral": {"edit_along_data_limit": 0.9}}},
     "guards.spectral.edit_along_data_limit 0.9 > 0.26"),
    ("ci", {"guards": {"rows": {"tau": 0.9}}}, "guards.rows.tau 0.9 > 0.37"),
    ("release", {"guards": {"rmt": {"null_tau": 0.5}}}, "guards.rmt.null_tau 0.5 > 0.31"),
    ("ci", {"guards": {"rmt": {"mode": "monitor"}}}, "guards.rmt.mode monitor instead of gate"),
    ("release", {"guards": {"invariants": {"mode": "off"}}},
     "guards.invariants.mode off instead of gate"),
    ("ci", {"guards": {"order": ["invariants", "rmt", "invariants"]}},
     "guards.order leaves out spectral, rows, variance"),
    ("ci", {"guards": {"spectral": {"scope": ["attn"]}}},
     "guards.spectral.scope ['attn'] instead of all"),
    ("release", {"guards": {"variance": {"targets": "edited_modules_only"}}},
     "guards.variance.targets edited_modules_only instead of all"),
    ("release", {"auto": {"tier": "conservative"}, "guards": {"variance": {"mode": "monitor"}}},
     "guards.variance.mode monitor instead of gate"),
])
def test_ci_and_release_refuse_settings_that_talk_the_evidence_down(profile, config, shortfall):
    """A lower confidence level, fewer calibration windows, a looser limit or a guard turned
    down is a shortfall like too few windows: refused, or allowed and recorded as weakened."""
    config = {**config, "auto": {**config.get("auto", {}), "profile": profile}}
    with pytest.raises(ConfigError, match=f"below the {profile} profile's evidence floor") as exc:
        policy.resolve(config)
    assert shortfall in str(exc.value) and exc.value.exit_code == 2
    allowed = policy.resolve({**config, "auto": {**config["auto"], "allow_underpowered": True}})
    assert shortfall in allowed.weakened
    dev = policy.resolve({**config, "auto": {**config["auto"], "profile": "dev"}})
    assert any(shortfall.split(" ")[0] in w for w in dev.weakened)  # dev records, no refusal


def test_stricter_settings_and_the_tiers_own_monitor_modes_are_not_weakenings():
    stricter = policy.resolve({"auto": {"profile": "release"},
                               "eval": {"bootstrap": {"alpha": 0.01},
                                        "primary_metric": {"ratio_limit": 1.02,
                                                           "drift_band": [0.97, 1.03]}},
                               "guards": {"calibration_windows": 128,
                                          "variance": {"mode": "gate"},
                                          "spectral": {"family_caps": {"ffn": 0.5}}}})
    assert stricter.weakened == ()
    assert policy.resolve({"auto": {"profile": "release"}}).weakened == ()  # VE monitor: tier's
    assert policy.resolve({"auto": {"profile": "release", "tier": "aggressive"}}).weakened == ()


def test_dev_records_instead_of_refusing_and_more_evidence_is_always_fine():
    small = policy.resolve({"auto": {"profile": "dev"}, "dataset": {"preview_n": 8, "final_n": 8}})
    assert small.windows.preview_n == 8 and not small.allow_underpowered
    more = policy.resolve({"auto": {"profile": "ci"}, "dataset": {"preview_n": 300, "final_n": 300},
                           "eval": {"bootstrap": {"replicates": 5000}}})
    assert more.bootstrap.replicates == 5000


def test_window_length_floor_follows_the_model_context():
    # A model with 256 positions cannot take the ci profile's 512: its floor is 256.
    assert policy.evidence_floor("ci", context_length=256).seq_len == 256
    assert policy.resolve({}, context_length=256).windows.seq_len == 256
    # An explicit window shorter than both the profile and the model is refused once the
    # model's context is known (still before any data is read).
    with pytest.raises(ConfigError, match="seq_len 128 < 256"):
        policy.resolve({"dataset": {"seq_len": 128}}, context_length=256)
    policy.resolve({"dataset": {"seq_len": 128}})  # context unknown: checked later


def test_allow_underpowered_must_be_a_boolean():
    with pytest.raises(ConfigError, match="allow_underpowered must be true or false"):
        policy.resolve({"auto": {"allow_underpowered": "yes"}})


def _certify(*args: str) -> tuple[int, dict, str]:
    import json

    from click.testing import CliRunner

    from invarlock.cli import main

    result = CliRunner().invoke(main, ["certify", *args, "--no-cache", "--json"],
                                catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_certify_refuses_below_floor_before_any_evaluation(tiny_gpt2_dir, sonnets_path,
                                                           tmp_path, monkeypatch):
    from invarlock import evaluate
    from invarlock.models import loading

    def forbidden(*_a, **_k):
        raise AssertionError("nothing may be loaded or evaluated for a refused config")

    monkeypatch.setattr(evaluate, "evaluate_windows", forbidden)
    monkeypatch.setattr(loading, "load_model", forbidden)
    preset = tmp_path / "small.yaml"
    preset.write_text("dataset: {seq_len: 64, preview_n: 12, final_n: 12}\n")
    code, payload, stderr = _certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                     "--dataset", str(sonnets_path), "--profile", "ci",
                                     "--preset", str(preset), "--out", str(tmp_path / "o"))
    assert code == 2 and "preview_n 12 < 200" in payload["error"]
    assert len([ln for ln in stderr.splitlines() if ln.strip()]) == 1  # one line, no traceback
    assert not (tmp_path / "o").exists()
    # A lower confidence level and fewer calibration windows are refused the same way.
    preset.write_text("eval: {bootstrap: {alpha: 0.45}}\nguards: {calibration_windows: 2}\n")
    code, payload, _ = _certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                "--dataset", str(sonnets_path), "--profile", "release",
                                "--preset", str(preset), "--out", str(tmp_path / "o"))
    assert code == 2 and "bootstrap.alpha 0.45 > 0.05" in payload["error"]
    assert "guards.calibration_windows 2 < 64" in payload["error"]
    assert not (tmp_path / "o").exists()


def test_underpowered_release_run_fails_on_the_evidence_flag_and_verifies(
        tiny_gpt2_dir, sonnets_path, tmp_path):
    from click.testing import CliRunner

    from invarlock.certificate import document
    from invarlock.cli import _human_summary, main
    from invarlock.verify import verify_certificate

    preset = tmp_path / "small.yaml"
    preset.write_text("dataset: {seq_len: 64, preview_n: 12, final_n: 12}\n"
                      "eval: {bootstrap: {replicates: 200, alpha: 0.45}}\n"
                      "guards: {calibration_windows: 2}\n")
    code, summary, _ = _certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                "--dataset", str(sonnets_path), "--profile", "release",
                                "--allow-underpowered", "--preset", str(preset),
                                "--out", str(tmp_path / "o"))
    cert = document.load_certificate(summary["certificate"])
    assert code == 1 and cert["verdict"]["status"] == "FAIL"
    assert cert["validation"]["evidence_meets_profile"] is False
    assert "evidence_meets_profile" in cert["gating"]
    assert any(r.startswith("evidence_meets_profile: evidence below the release profile "
                            "(--allow-underpowered)") for r in cert["verdict"]["reasons"])
    ev = cert["evidence"]
    assert {"bootstrap.alpha 0.45 > 0.05 (a 55% interval, the profile promises 95%)",
            "guards.calibration_windows 2 < 64"} <= set(ev["shortfalls"])
    assert _human_summary(summary).startswith("FAIL: ratio 1.0000, 55% CI [")
    assert ev["floor"] == {"preview_n": 400, "final_n": 400, "seq_len": 128, "replicates": 3200}
    assert ev["actual"] == {"preview_n": 12, "final_n": 12, "seq_len": 64, "replicates": 200}
    md = (tmp_path / "o" / document.MARKDOWN_FILENAME).read_text(encoding="utf-8")
    assert "Evidence below the release profile" in md and "`evidence_meets_profile`" in md
    html = (tmp_path / "o" / "evaluation.report.html").read_text(encoding="utf-8")
    assert "Evidence below the release profile" in html
    assert verify_certificate(cert).differences == ()
    assert CliRunner().invoke(main, ["verify", summary["certificate"]]).exit_code == 1

    # Claiming the evidence met the profile is caught by verify's recomputation.
    forged = {k: v for k, v in cert.items() if k != "digest"}
    forged["evidence"] = {**ev, "meets_profile": True, "shortfalls": []}
    forged["validation"] = {**cert["validation"], "evidence_meets_profile": True}
    report = verify_certificate(document.seal(forged))
    assert any(d.startswith("evidence.meets_profile") for d in report.differences)
    assert any(d.startswith("validation.evidence_meets_profile") for d in report.differences)
    # So is hiding that the run was below a refusing floor without the explicit allowance.
    hidden = {k: v for k, v in cert.items() if k != "digest"}
    hidden["evidence"] = {**ev, "allow_underpowered": False}
    report = verify_certificate(document.seal(hidden))
    assert any("without allow_underpowered" in d for d in report.differences)


def test_dev_shrinking_windows_to_fit_the_data_sets_the_flag(tiny_gpt2_dir, sonnets_path,
                                                             tmp_path):
    from invarlock.certificate import document

    preset = tmp_path / "big.yaml"
    preset.write_text("dataset: {seq_len: 64, preview_n: 5000, final_n: 5000}\n"
                      "eval: {bootstrap: {replicates: 500}}\n")
    code, summary, _ = _certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                "--dataset", str(sonnets_path), "--profile", "dev",
                                "--preset", str(preset), "--out", str(tmp_path / "o"))
    cert = document.load_certificate(summary["certificate"])
    assert cert["evidence"]["shrunk_to_fit"] is True
    assert cert["validation"]["evidence_meets_profile"] is False
    assert "evidence_meets_profile" not in cert["gating"]  # recorded, not gating, in dev
    assert any("shrunk to fit the data" in s for s in cert["evidence"]["shortfalls"])
    assert code == (0 if summary["verdict"] == "PASS" else 1)
