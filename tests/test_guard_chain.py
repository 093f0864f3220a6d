"""The guard chain: settings, taps that only observe, re-checks, the cache, plugins."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from invarlock import guards
from invarlock.enums import GuardMode
from invarlock.errors import ConfigError
from invarlock.guards import ChainSettings, GuardDecision, Stage
from invarlock.guards.measure.probe import Probe
from invarlock.policy import resolve
from tests import guardkit as kit


@pytest.fixture(scope="module")
def fast_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "fast.yaml"
    path.write_text(kit.FAST)
    return path


@pytest.fixture(scope="module")
def int8_cert(tiny_gpt2_dir, fast_preset, sonnets_path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("int8")
    code, _, cert = kit.certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                "--dataset", str(sonnets_path), "--profile", "dev",
                                "--preset", str(fast_preset), "--out", str(out))
    assert code == 0
    return cert


def test_tier_settings_and_validation():
    settings = ChainSettings.from_policy(resolve({"auto": {"profile": "dev"}}).values["guards"])
    assert settings.order == guards.CANONICAL_ORDER
    assert settings.active == ("invariants", "spectral", "rows", "rmt", "variance")
    assert settings.modes["rows"] is GuardMode.GATE
    assert settings.modes["variance"] is GuardMode.MONITOR and settings.calibration_windows == 16
    cons = ChainSettings.from_policy(resolve({"auto": {"tier": "conservative"}}).values["guards"])
    assert cons.modes["variance"] is GuardMode.GATE and cons.calibration_windows == 32
    with pytest.raises(ConfigError, match="did you mean 'spectral'"):
        ChainSettings.from_policy({"order": ["invariants", "spectal"]})
    with pytest.raises(ConfigError, match="more than once"):
        ChainSettings.from_policy({"order": ["rmt", "rmt"], "rmt": {"mode": "gate"}})
    with pytest.raises(ConfigError, match="mode"):
        ChainSettings.from_policy({"order": ["rmt"], "rmt": {"mode": "loud"}})


def test_order_and_off_choose_which_guards_run(tiny_gpt2_dir, fast_preset, sonnets_path,
                                               tmp_path):
    preset = tmp_path / "order.yaml"
    preset.write_text("guards: {order: [invariants, rmt, invariants], rmt: {mode: off}}\n")
    code, _, cert = kit.certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                "--dataset", str(sonnets_path), "--profile", "dev", "--preset",
                                str(fast_preset), "--preset", str(preset), "--out",
                                str(tmp_path / "o"))
    assert code == 0 and list(cert["guards"]) == ["invariants"]
    assert "spectral_stable" not in cert["validation"]
    assert not any(k.startswith("guard_rmt") for k in cert["timings"])


def test_taps_do_not_change_outputs(tiny_gpt2_dir, sonnets_path):
    """Logits and per-window losses are bit-identical with and without every guard's taps."""
    import torch

    from invarlock import evaluate
    from invarlock.data.corpus import DatasetSource, load_corpus
    from invarlock.data.windows import plan_windows
    from invarlock.enums import MetricKind
    from invarlock.guards.measure.run import GuardRun, run_info
    from invarlock.models import loading, source, tokenizer

    src = source.resolve_model_source(str(tiny_gpt2_dir))
    loaded = loading.load_model(src, adapter="auto", device="cpu")
    policy = resolve({"auto": {"profile": "dev"},
                      "dataset": {"seq_len": 64, "preview_n": 8, "final_n": 8}})
    corpus = load_corpus(DatasetSource("text", path=str(sonnets_path)), labelled=False)
    plan = plan_windows(corpus, loaded.tokenizer, kind=MetricKind.PPL_CAUSAL, seq_len=64,
                        stride=64, preview_n=8, final_n=8, seed=1, strict=True,
                        tokenizer_hash=tokenizer.tokenizer_hash(loaded.tokenizer))
    chain = ChainSettings.from_policy(policy.values["guards"])
    run = GuardRun(chain, policy.values["guards"],
                   run_info(MetricKind.PPL_CAUSAL, "cpu", plan, chain, policy))
    with kit.one_thread():
        for phase in ("preview", "final"):
            windows = getattr(plan, phase)
            taps = run.taps(loaded.model, "baseline", phase)
            assert taps, phase
            plain = evaluate.evaluate_windows(loaded.model, windows, kind="ppl_causal",
                                              device="cpu", batch_size=3)
            tapped = evaluate.evaluate_windows(loaded.model, windows, kind="ppl_causal",
                                               device="cpu", batch_size=3, taps=taps)
            assert np.array_equal(plain.values, tapped.values)
        # and the logits themselves, with the taps' hooks attached by hand
        ids = torch.as_tensor(plan.final.input_ids[:4])
        with torch.inference_mode():
            reference = loaded.model(input_ids=ids).logits.clone()
            taps = run.taps(loaded.model, "subject", "final")
            handles = [module.register_forward_hook(
                lambda _m, _a, out, tap=tap, name=name: tap.observe(
                    name, out, evaluate.TapContext(plan.final.window_ids[:4],
                                                   torch.ones_like(ids))))
                for tap in taps for name, module in tap.modules(loaded.model)]
            observed = loaded.model(input_ids=ids).logits
            for handle in handles:
                handle.remove()
    assert handles and torch.equal(reference, observed)
    assert run.baseline_done()["rmt"]["state"]["modules"]  # the taps did observe


def test_recheck_reproduces_every_flag_of_a_fresh_certificate(int8_cert):
    """From the certificate as a reader gets it (JSON), every guard's recheck gives its flag
    and reason; the recheck reads the recorded policy and measurements, so moving a threshold
    past what was measured changes the decision (a recheck that ignored them would not)."""
    import json

    cert = json.loads(json.dumps(int8_cert))
    values = cert["policy"]["values"]["guards"]
    assert set(cert["guards"]) == {"invariants", "spectral", "rows", "rmt", "variance"}
    for name, section in cert["guards"].items():
        check = guards.recheck(name, section, values[name])
        assert check.flag == section["flag"]
        assert check.passed == section["passed"] == cert["validation"][check.flag] is True
        assert check.reason == section["reason"]
    stricter = {
        "spectral": {"deadband": 0.0, "module_change_limit": 0.0},  # INT8 moves every σ
        "variance": {"discovery": {**values["variance"]["discovery"], "deadband": 0.0,
                                   "min_abs_adjust": 0.0}},  # proposals, but no gate ran
        "rmt": {"epsilon_by_family": {f: -1.0 for f in values["rmt"]["epsilon_by_family"]}},
    }
    for name, change in stricter.items():
        check = guards.recheck(name, cert["guards"][name], {**values[name], **change})
        assert not check.passed and check.reason != cert["guards"][name]["reason"], name
    fingerprint = copy.deepcopy(cert["guards"]["invariants"])
    fingerprint["measurements"]["post"]["fingerprint_after"] = "sha256:" + "1" * 64
    assert not guards.recheck("invariants", fingerprint, values["invariants"]).passed


def _edited(cert: dict, name: str, edit: Any) -> Any:
    section = copy.deepcopy(cert["guards"][name])
    edit(section["measurements"])
    return guards.recheck(name, section, cert["policy"]["values"]["guards"][name])


def test_editing_a_stored_measurement_changes_the_outcome(int8_cert):
    def triple_sigma(m: dict) -> None:  # the σ a block linear is gated on: along the data
        module = m["modules"][3]
        assert module["sigma_basis"] == "data"
        module["sigma_data_subject"] = 3 * module["sigma_data_baseline"]

    def new_outliers(m: dict) -> None:  # ten new outliers in every window group
        m["modules"][0]["subject"] = [[5.0] * 10 + g for g in m["modules"][0]["baseline"]]

    def new_fingerprint(m: dict) -> None:
        m["post"]["fingerprint_after"] = "sha256:" + "0" * 64

    def shift_moment(m: dict) -> None:
        m["modules"][0]["m2_subject"] = 0.5 * m["modules"][0]["m2_baseline"]

    def one_row_beyond(m: dict) -> None:
        m["tensors"][0]["beyond"]["unseen"] = 1

    for name, edit, words in (("spectral", triple_sigma, "violation"),
                              ("rmt", new_outliers, "Marchenko–Pastur edge"),
                              ("invariants", new_fingerprint, "changed during certification"),
                              ("variance", shift_moment, "not evaluated"),
                              ("rows", one_row_beyond, "beyond τ")):
        assert int8_cert["guards"][name]["passed"]
        check = _edited(int8_cert, name, edit)
        assert not check.passed and words in check.reason, name
    # an embedding has no input sketch: its σ is gated in weight space
    embedding = next(i for i, m in enumerate(int8_cert["guards"]["spectral"]["measurements"]
                                             ["modules"]) if m["sigma_basis"] == "weights")

    def triple_weight_sigma(m: dict) -> None:
        m["modules"][embedding]["sigma_subject"] = 3 * m["modules"][embedding]["sigma_baseline"]

    assert not _edited(int8_cert, "spectral", triple_weight_sigma).passed
    # the edit size along the data is gated: a structural edit that keeps σ (permuted
    # rows) fails ...
    check = _edited(int8_cert, "spectral", lambda m: next(
        x for x in m["modules"] if x["edit_along_data"] is not None).update(
            edit_along_data=0.5))
    assert not check.passed and "along the data" in check.reason
    # ... and an edit that does not matter leaves the outcome alone
    assert _edited(int8_cert, "spectral", lambda m: m["modules"][0].update(
        sigma_baseline=m["modules"][0]["sigma_baseline"] * (1 + 1e-9))).passed


def test_recheck_of_an_unknown_guard_says_it_is_not_installed(int8_cert):
    with pytest.raises(guards.UnknownGuardError, match="cannot re-check guard toy "
                                                       r"\(not installed\)"):
        guards.recheck("toy", {"measurements": {}}, {})


def test_second_subject_reuses_baseline_and_its_guard_states(tiny_gpt2_dir, fast_preset,
                                                             sonnets_path, tmp_path):
    args = ["--baseline", str(tiny_gpt2_dir), "--dataset", str(sonnets_path), "--profile",
            "dev", "--preset", str(fast_preset)]
    cache = tmp_path / "cache"
    _, _, one = kit.certify(*args, "--edit", "quant_rtn", "--out", str(tmp_path / "a"),
                            cache=cache)
    _, _, two = kit.certify(*args, "--edit", "quant_rtn", "--out", str(tmp_path / "b"),
                            cache=cache)
    assert one["baseline"]["results_from_cache"] is False
    assert two["baseline"]["results_from_cache"] is True
    assert "baseline_eval_s" not in two["timings"]
    for name in ("spectral", "rmt", "variance"):
        assert one["guards"][name]["measurements"] == two["guards"][name]["measurements"], name
    # other guard settings that shape the baseline's measurements: evaluated again
    other = tmp_path / "k.yaml"
    other.write_text("guards: {calibration_windows: 6}\n")
    _, _, three = kit.certify(*args, "--preset", str(other), "--edit", "quant_rtn", "--out",
                              str(tmp_path / "c"), cache=cache)
    assert three["baseline"]["results_from_cache"] is False
    assert three["guards"]["rmt"]["measurements"]["windows"] == 6


class ParameterCountGuard:
    """A plugin-style guard: the subject must have as many parameters as the baseline."""

    name = "param_count"
    flag = "param_count_equal"
    stages = (Stage.STRUCTURE,)
    measures = "number of parameters of both models"

    def decide(self, measurements: Mapping[str, Any],
               policy: Mapping[str, Any]) -> GuardDecision:
        diff = abs(measurements["subject"] - measurements["baseline"])
        ok = diff <= int(policy.get("tolerance", 0))
        return GuardDecision(ok, f"parameter counts differ by {diff}")

    def probe(self, policy: Mapping[str, Any]) -> Probe:
        return ParameterCountProbe(policy)


class ParameterCountProbe(Probe):
    def baseline_loaded(self, model: Any) -> None:
        self.count = sum(p.numel() for p in model.parameters())

    def baseline_state(self) -> dict[str, Any]:
        return {"count": self.count}

    def measure(self, ctx: Any, baseline: Mapping[str, Any]) -> dict[str, Any]:
        return {"baseline": baseline["count"],
                "subject": sum(p.numel() for p in ctx.model.parameters())}


def test_a_registered_plugin_guard_runs_gates_and_rechecks(tiny_gpt2_dir, fast_preset,
                                                           sonnets_path, tmp_path):
    with pytest.raises(TypeError, match="Guard protocol"):
        guards.register(object())  # type: ignore[arg-type]
    guards.register(ParameterCountGuard())
    try:
        with pytest.raises(ValueError, match="already registered"):
            guards.register(ParameterCountGuard())
        preset = tmp_path / "plugin.yaml"
        preset.write_text("guards:\n  order: [invariants, param_count, invariants]\n"
                          "  param_count: {mode: gate, tolerance: 0}\n")
        code, _, cert = kit.certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                    "--dataset", str(sonnets_path), "--profile", "dev",
                                    "--preset", str(fast_preset), "--preset", str(preset),
                                    "--out", str(tmp_path / "o"))
        assert code == 0 and cert["validation"]["param_count_equal"] is True
        assert "param_count_equal" in cert["gating"]
        section = cert["guards"]["param_count"]
        values = cert["policy"]["values"]["guards"]["param_count"]
        assert guards.recheck("param_count", section, values).passed
        section["measurements"]["subject"] += 1
        assert not guards.recheck("param_count", section, values).passed
    finally:
        guards.unregister("param_count")
    with pytest.raises(ConfigError, match="unknown guard 'param_count'"):
        ChainSettings.from_policy({"order": ["param_count"]})


def test_decisions_and_rechecks_need_no_torch(int8_cert, tmp_path):
    """verify re-checks guards on machines without torch: the pure side must not import it."""
    import json
    import subprocess
    import sys

    path = tmp_path / "cert.json"
    path.write_text(json.dumps(int8_cert))
    code = ("import json, sys\n"
            "sys.modules['torch'] = None  # any import of torch now fails\n"
            "from invarlock import guards\n"
            f"cert = json.load(open({str(path)!r}))\n"
            "for name, section in cert['guards'].items():\n"
            "    check = guards.recheck(name, section, cert['policy']['values']['guards'][name])\n"
            "    assert check.passed == section['passed'], name\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


class TouchingGuard:
    """A plugin guard whose measurement writes the subject's weights (a misbehaving pass)."""

    name = "toucher"
    flag = "toucher_ok"
    stages = (Stage.ACTIVATIONS,)
    measures = "nothing; nudges one weight"

    def decide(self, measurements: Mapping[str, Any],
               policy: Mapping[str, Any]) -> GuardDecision:
        return GuardDecision(True, "touched")

    def probe(self, policy: Mapping[str, Any]) -> Probe:
        return TouchingProbe(policy)


class TouchingProbe(Probe):
    def measure(self, ctx: Any, baseline: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            next(ctx.model.parameters()).view(-1)[0] += 1.0
        return {"evaluated": True}


def test_last_invariants_check_runs_after_every_pass_that_touches_the_subject(
        tiny_gpt2_dir, fast_preset, sonnets_path, tmp_path):
    """The fingerprint is taken after every other guard measured (VE's extra forward too),
    whatever the order lists; a guard that wrote the subject is caught."""
    guards.register(TouchingGuard())
    try:
        preset = tmp_path / "touch.yaml"
        preset.write_text("guards:\n  order: [invariants, spectral, toucher, invariants]\n"
                          "  toucher: {mode: monitor}\n")
        code, _, cert = kit.certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                    "--dataset", str(sonnets_path), "--profile", "dev",
                                    "--preset", str(fast_preset), "--preset", str(preset),
                                    "--out", str(tmp_path / "o"))
    finally:
        guards.unregister("toucher")
    assert code == 1 and cert["validation"]["invariants_pass"] is False
    assert "weights changed during certification" in cert["guards"]["invariants"]["reason"]


@pytest.mark.parametrize("mode", ["gate", "monitor"])
def test_a_guard_that_matched_no_module_is_not_measured(tiny_gpt2_dir, fast_preset,
                                                        sonnets_path, tmp_path, mode):
    """RMT taps block linears only; scoped to embeddings it observes nothing: a gating guard
    fails, a monitoring one records the same and the verdict does not depend on it."""
    preset = tmp_path / "scope.yaml"
    preset.write_text(f"guards: {{rmt: {{mode: {mode}, scope: [embed]}}}}\n")
    code, _, cert = kit.certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                "--dataset", str(sonnets_path), "--profile", "dev",
                                "--preset", str(fast_preset), "--preset", str(preset),
                                "--out", str(tmp_path / "o"))
    section = cert["guards"]["rmt"]
    assert section["passed"] is False
    assert section["reason"].startswith("not measured: no module matched")
    assert code == (1 if mode == "gate" else 0)
