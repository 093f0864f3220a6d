"""Calibration: the recipe's statistics, the noise reference edit, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import norm

from invarlock.calibration import recipe
from tests import guardkit as kit


def _calibrate(baseline: Path, dataset: Path, tmp_path: Path, *args: str):
    """`invarlock calibrate` on the fast preset into tmp_path/cal, single-threaded."""
    from click.testing import CliRunner

    from invarlock.cli import main

    fast = tmp_path / "fast.yaml"
    fast.write_text(kit.FAST)
    with kit.one_thread():
        return CliRunner().invoke(main, [
            "calibrate", "--baseline", str(baseline), "--dataset", str(dataset),
            "--preset", str(fast), "--out", str(tmp_path / "cal"), "--json", *args],
            catch_exceptions=False)


def test_budget_split_by_family_size():
    # 120 modules, budget 5: B_f = floor(5 M_f / 120 + 0.5)
    assert recipe.budget_split(5, {"ffn": 40, "attn": 40, "embed": 8, "other": 32}) == {
        "ffn": 2, "attn": 2, "embed": 0, "other": 1}
    assert recipe.budget_split(3, {"attn": 120, "ffn": 90, "embed": 1}) == {
        "attn": 2, "ffn": 1, "embed": 0}


def test_kappa_order_statistic_and_parametric():
    # the B_f-th largest |z| plus the margin; over runs the largest
    runs = [[2.1, 1.8, 1.6, 1.5, 1.4], [1.2, 1.7, 0.3]]
    assert recipe.kappa_order_statistic(runs, 2, 0.1) == pytest.approx(1.9)
    assert recipe.kappa_order_statistic(runs, 0, 0.1) == pytest.approx(2.2)  # at least one
    assert recipe.kappa_order_statistic([[0.5]], 3, 0.0) == 0.5  # fewer modules than B_f
    assert recipe.kappa_parametric(40, 2, 0.1) == pytest.approx(norm.ppf(0.975) + 0.1)
    # on many normal samples the two rules agree
    rng = np.random.default_rng(0)
    z = [np.abs(rng.normal(size=4000)).tolist()]
    assert recipe.kappa_order_statistic(z, 100, 0.0) == pytest.approx(
        recipe.kappa_parametric(4000, 100, 0.0), abs=0.05)


def test_epsilon_min_effect_and_windows():
    deltas = list(np.linspace(-0.01, 0.04, 101))
    assert recipe.epsilon(deltas, 0.95, small=False, floor=0.01) == pytest.approx(0.0375 + 0.01)
    assert recipe.epsilon(deltas, 0.95, small=True, floor=0.01) == pytest.approx(0.05)
    assert recipe.epsilon([-0.02, -0.01], 0.95, small=False, floor=0.01) == pytest.approx(0.01)
    assert recipe.min_effect(0.02, 16, 0.05, "one-sided") == pytest.approx(
        norm.ppf(0.95) * 0.02 / 4)
    assert recipe.min_effect(0.02, 16, 0.05, "two-sided") == pytest.approx(
        norm.ppf(0.975) * 0.02 / 4)
    n = recipe.windows_for_half_width(0.02, 0.002, 0.05)
    assert n == int(np.ceil((norm.ppf(0.975) * 10) ** 2))
    assert norm.ppf(0.975) * 0.02 / np.sqrt(n) <= 0.002


def test_noise_edit_is_one_int8_step_per_channel_and_seeded(tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.calibration.perturb import NoisePlan, apply_noise

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    models = [AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir) for _ in range(3)]
    results = [apply_noise(m, NoisePlan(seed=s)) for m, s in zip(models, (0, 0, 1),
                                                                  strict=True)]
    assert results[0].modules_changed == results[2].modules_changed
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: output channels are columns
    w = base.state_dict()[name]
    diff = models[0].state_dict()[name] - w
    step = w.abs().amax(dim=0) / 127
    assert torch.all(diff.abs() <= step / 2 + 1e-7) and diff.abs().max() > step.max() / 4
    assert torch.equal(models[0].state_dict()[name], models[1].state_dict()[name])
    assert not torch.equal(models[0].state_dict()[name], models[2].state_dict()[name])
    assert torch.equal(models[0].state_dict()["transformer.wte.weight"],
                       base.state_dict()["transformer.wte.weight"])


def test_calibrate_writes_a_preset_that_certify_accepts(tiny_gpt2_dir, sonnets_path, tmp_path):
    result = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path, "--seeds", "2")
    fast, out = tmp_path / "fast.yaml", tmp_path / "cal"
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["runs"] == 3
    stats = json.loads((out / "calibration.json").read_text())
    assert stats["runs"] == ["quant_rtn:int8", "quant_noise:0", "quant_noise:1"]
    assert stats["spectral"]["attn"]["budget"] == 2 and "order_statistic" in stats["spectral"][
        "attn"]
    assert stats["spectral"]["embed"]["note"].startswith("too few modules")
    assert len((out / "calibration.csv").read_text().splitlines()) == 4
    preset = yaml.safe_load((out / "calibration.yaml").read_text())
    caps = preset["guards"]["spectral"]["family_caps"]
    assert caps["attn"] == pytest.approx(np.ceil(stats["spectral"]["attn"][
        "order_statistic"] * 100) / 100)
    for cert_path in stats["certificates"]:
        cert = json.loads(Path(cert_path).read_text())
        assert cert["guards"]["spectral"]["mode"] == "monitor"
    # the distribution limits of the preset follow from the reference runs' rows by the rule
    # the shipped tiers use (invarlock.calibration.distribution_limits)
    from invarlock.calibration import distribution_limits

    rows = stats["distribution"]["rows"]
    assert [r["family"] for r in rows] == ["quant_rtn_int8", "quant_noise", "quant_noise"]
    assert preset["eval"]["distribution"] == distribution_limits.derive(
        rows, {"balanced": 2.0})["balanced"] == stats["distribution"]["limits"]
    code, summary, cert = kit.certify("--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn",
                                      "--dataset", str(sonnets_path), "--profile", "dev",
                                      "--preset", str(fast), "--preset",
                                      str(out / "calibration.yaml"), "--out", str(tmp_path / "c"))
    assert code == 0, summary
    assert cert["policy"]["values"]["guards"]["spectral"]["family_caps"] == caps
    assert {k: cert["policy"]["values"]["distribution"][k]
            for k in preset["eval"]["distribution"]} == preset["eval"]["distribution"]
    assert "guards.spectral.family_caps.attn" in cert["policy"]["overrides"]
    # --resume recomputes the statistics from the stored reference certificates
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    again = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path, "--seeds", "2", "--resume")
    assert again.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == before
    assert yaml.safe_load((out / "calibration.yaml").read_text()) == preset


def test_zoo_edits_are_seeded_and_do_what_they_say(tiny_llama_dir, tiny_gpt2_dir):
    """Independent zoo edits: same seed, same weights; norm folds keep the outputs; harmful
    edits change what they name."""
    import torch
    from transformers import AutoModelForCausalLM

    from invarlock.calibration import zoo, zoo_run

    assert set(zoo.BENIGN) == set(zoo_run.BENIGN) and set(zoo.HARMFUL) == set(zoo_run.HARMFUL)
    # GPT-2's MLP has no gate: no up → down pair to rescale
    for model_dir, skip in ((tiny_llama_dir, frozenset()),
                            (tiny_gpt2_dir, frozenset({"updown_scale"}))):
        def fresh(model_dir=model_dir):
            return AutoModelForCausalLM.from_pretrained(model_dir).eval()

        kit.check_zoo_edits(fresh, fold_atol=1e-4, harm_atol=1e-3, not_applicable=skip)
        with torch.no_grad():
            pruned = fresh()
            result = zoo.prune(pruned, 3)
        sparsity = result.plan["sparsity"]
        assert 0.02 <= sparsity <= 0.10
        w = dict(pruned.named_modules())[result.modules_changed[0]].weight
        assert (w == 0).float().mean().item() == pytest.approx(sparsity, abs=0.01)
        # seed 0 is the top of the range: the reference runs hold the family's largest change
        with torch.no_grad():
            assert zoo.prune(fresh(), 0).plan["sparsity"] == zoo.PRUNE_SPARSITY[1] == 0.10


# --- the shipped numbers, recomputed from the committed raw inputs ---------------------------

def _committed() -> dict[str, dict[str, object]]:
    """{model: {"json": calibration.json as a dict, "csv": calibration.csv as text,
    "modules": rmt-null-modules.csv, "ve": ve-paired-windows.csv as text, or None}}."""
    from invarlock.policy import policies_dir

    root = policies_dir() / "calibration"
    out: dict[str, dict[str, object]] = {}
    for path in sorted(root.glob("*/calibration.json")):
        modules, ve = path.parent / "rmt-null-modules.csv", path.parent / "ve-paired-windows.csv"
        out[path.parent.name] = {"json": json.loads(path.read_text()),
                                 "csv": (path.parent / "calibration.csv").read_text(),
                                 "modules": modules.read_text() if modules.is_file() else None,
                                 "ve": ve.read_text() if ve.is_file() else None}
    return out


def _mismatches(files: dict[str, dict[str, object]]) -> list[str]:
    """Every shipped number (tiers.yaml, the statistics table of CALIBRATION.md, the derived
    fields of calibration.json) that the raw rows do not reproduce, one line each."""
    from invarlock.calibration import rmt_null, tiers
    from invarlock.policy import policies_dir

    try:
        models = [tiers.ModelCalibration(
            name, f["json"], tiers.parse_rows(f["csv"], name),
            tuple(rmt_null.parse_module_rows(f["modules"], name) if f["modules"] else ()),
            tiers.parse_ve_windows(f["ve"], name) if f.get("ve") else ())
            for name, f in files.items()]
    except (ValueError, KeyError) as exc:
        return [f"raw rows unreadable: {exc}"]
    problems = [line for m in models for line in tiers.check(m)]
    shipped = yaml.safe_load((policies_dir() / "tiers.yaml").read_text())
    for tier, values in tiers.derive(models, shipped).items():
        guards = shipped[tier]["guards"]
        if guards["spectral"]["family_caps"] != pytest.approx(values["family_caps"]):
            problems.append(f"{tier}: family_caps {guards['spectral']['family_caps']} but "
                            f"the rows give {values['family_caps']}")
        if guards["spectral"]["module_change_limit"] != pytest.approx(
                values["module_change_limit"]):
            problems.append(f"{tier}: module_change_limit "
                            f"{guards['spectral']['module_change_limit']} but the rows give "
                            f"{values['module_change_limit']}")
        effect = guards["variance"]["gating"]["min_effect_lognll"]
        if values["min_effect_lognll"] is not None and effect != pytest.approx(
                values["min_effect_lognll"]):
            problems.append(f"{tier}: min_effect_lognll {effect} but VE's own paired delta "
                            f"gives {values['min_effect_lognll']}")
        tau = guards["rmt"]["null_tau"]
        if values["null_tau"] is not None and tau != pytest.approx(values["null_tau"]):
            problems.append(f"{tier}: rmt null_tau {tau} but the module rows give "
                            f"{values['null_tau']}")
        for family, slack in values["null_slack"].items():  # ε is chosen; it must cover
            if guards["rmt"]["epsilon_by_family"][family] < slack:
                problems.append(f"{tier}: rmt ε {family} below the null slack {slack}")
    doc = (policies_dir() / "CALIBRATION.md").read_text()
    problems += [f"CALIBRATION.md lacks the recomputed row {line!r}"
                 for line in tiers.statistics_table(models) if line not in doc]
    return problems


def test_shipped_tiers_recompute_from_the_committed_calibration():
    """Every calibrated number in policies/tiers.yaml, the statistics table of
    CALIBRATION.md and the derived fields of calibration.json follow from the raw rows
    committed in policies/calibration/<model>/ (calibration.csv, and the per-run |z| of
    calibration.json), by the documented rules (invarlock/calibration/tiers.py)."""
    files = _committed()
    assert {"demo", "smollm2"} <= set(files)
    assert _mismatches(files) == []


def _rewrite_rows(files, model: str, change, json_too: bool = True) -> None:
    """Apply `change(row)` to every CSV row of `model` and to calibration.json's copy."""
    import csv
    import io

    text = files[model]["csv"]
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        change(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files[model]["csv"] = out.getvalue()
    for row in files[model]["json"]["per_run"] if json_too else ():
        change(row)


def _float_field(key: str, value):
    def change(row):
        if row.get(key) not in (None, ""):
            row[key] = value(float(row[key]))
    return change


def test_every_max_sigma_change_at_4_9_percent_is_caught():
    files = _committed()
    for model in files:
        _rewrite_rows(files, model, _float_field("max_abs_change", lambda _v: 0.049))
    problems = _mismatches(files)
    assert any("module_change_limit 0.08 but the rows give 0.1" in p for p in problems)
    assert any("CALIBRATION.md lacks" in p and "4.9000%" in p for p in problems)


def test_removing_the_rmt_null_slack_is_caught():
    files = _committed()
    _rewrite_rows(files, "smollm2", _float_field("attn_rmt_delta", lambda _v: 0.0))
    problems = _mismatches(files)
    assert any("rmt.attn.null_deltas differ from the CSV column" in p for p in problems)
    assert any("CALIBRATION.md lacks" in p and "attn 0.000, ffn" in p for p in problems)


def test_changing_one_rmt_module_row_is_caught():
    """null_tau is recomputed from the committed per-module RMT inputs: one module's excess
    changed (its run's null scale moves) or a garbled count no longer reproduces the run's
    recorded null scale, and a larger excess in the worst run moves null_tau itself."""
    files = _committed()
    lines = files["smollm2"]["modules"].splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("zoo:prune:0,"))
    run, module, _, near = lines[at].split(",")
    lines[at] = ",".join([run, module, "30.0", near])
    files["smollm2"]["modules"] = "\n".join(lines) + "\n"
    problems = _mismatches(files)
    assert any(p.startswith("smollm2: rmt_null") for p in problems)
    assert any(p.startswith("smollm2: zoo:prune:0 rmt_null_scale") for p in problems)
    assert any(p.startswith("balanced: rmt null_tau 0.31 but the module rows give")
               for p in problems)
    files = _committed()
    header, first, *rest = files["demo"]["modules"].splitlines()
    cells = first.split(",")
    files["demo"]["modules"] = "\n".join([header, ",".join([*cells[:2], "x", cells[3]]),
                                          *rest]) + "\n"
    assert "must be numbers" in _mismatches(files)[0]


def test_changing_one_ve_window_is_caught():
    """VE's σ_Δ is recomputed from the committed gate windows (NLL plain and scaled): one
    window's scaled loss changed no longer gives its run's ve_sigma_delta nor the pooled σ."""
    files = _committed()
    header, first, *rest = files["demo"]["ve"].splitlines()
    cells = first.split(",")
    cells[4] = str(float(cells[4]) + 5.0)  # nll_scaled of the first window
    files["demo"]["ve"] = "\n".join([header, ",".join(cells), *rest]) + "\n"
    problems = _mismatches(files)
    assert any(p.startswith(f"demo: {cells[0]} ve_sigma_delta") for p in problems)
    assert any(p.startswith("demo: variance.sigma_delta") for p in problems)


def test_ve_min_effect_is_calibrated_only_when_every_model_recorded_it():
    """σ_Δ is in nats/token of one model's loss: with the demo's VE windows alone the tiers
    keep their designed minimum effect (None here); once every model has them, the larger
    model's value is the tier's."""
    from invarlock.calibration import rmt_null, tiers
    from invarlock.policy import policies_dir

    shipped = yaml.safe_load((policies_dir() / "tiers.yaml").read_text())
    files = _committed()
    models = {name: tiers.ModelCalibration(
        name, f["json"], tiers.parse_rows(f["csv"], name),
        tuple(rmt_null.parse_module_rows(f["modules"]) if f["modules"] else ()),
        tiers.parse_ve_windows(f["ve"]) if f["ve"] else ()) for name, f in files.items()}
    with_ve = [m for m in models.values() if m.ve_windows]
    assert with_ve
    if len(with_ve) < len(models):
        assert tiers.derive(list(models.values()), shipped)["balanced"][
            "min_effect_lognll"] is None
    alone = tiers.derive(with_ve[:1], shipped)["balanced"]["min_effect_lognll"]
    sigma = recipe.ve_statistics(with_ve[0].ve_rows(), with_ve[0].settings)["sigma_delta"]
    assert alone == pytest.approx(np.ceil(norm.ppf(0.95) * sigma / 4 * 10 ** (
        1 - np.floor(np.log10(norm.ppf(0.95) * sigma / 4)))) / 10 ** (
        1 - np.floor(np.log10(norm.ppf(0.95) * sigma / 4))))


def test_tenfold_sigma_delta_is_caught():
    """σ_Δ of the primary metric sizes the windows: ten times it in every row (CSV and the
    JSON copy alike) no longer gives the recorded σ_Δ or window count."""
    files = _committed()
    _rewrite_rows(files, "smollm2", _float_field("sigma_delta", lambda v: 10 * v))
    problems = _mismatches(files)
    assert any(p.startswith("smollm2: windows.sigma_delta") for p in problems)
    assert any(p.startswith("smollm2: windows.recommended_per_set 575") for p in problems)
    assert any("CALIBRATION.md lacks" in p and "0.12228" in p for p in problems)
    files = _committed()  # in the CSV alone: the rows disagree with their runs' statistics
    _rewrite_rows(files, "smollm2", _float_field("sigma_delta", lambda v: 10 * v),
                  json_too=False)
    assert "smollm2: CSV rows differ from calibration.json per_run" in _mismatches(files)


def test_garbage_rows_are_caught():
    files = _committed()
    header, *rows = files["demo"]["csv"].splitlines()
    files["demo"]["csv"] = "\n".join([header, *("x" * len(row) for row in rows)]) + "\n"
    assert _mismatches(files)[0].startswith("raw rows unreadable")
    files = _committed()
    header, first, *rest = files["demo"]["csv"].splitlines()
    files["demo"]["csv"] = "\n".join([header, first.replace("0.", "O.", 1), *rest]) + "\n"
    assert "must be a number" in _mismatches(files)[0]


def test_ve_min_effect_comes_from_ves_own_paired_delta_and_follows_it():
    """With VE's own per-run σ_Δ in the rows the minimum effect is z·σ/√K of their pooled
    value (not the primary metric's σ_Δ), and ten times σ gives ten times the effect."""
    from invarlock.calibration import tiers
    from invarlock.policy import policies_dir

    shipped = yaml.safe_load((policies_dir() / "tiers.yaml").read_text())

    def derived(scale: float) -> tuple[float, dict]:
        files = _committed()

        def add_ve(row):
            row["ve_sigma_delta"], row["ve_windows"] = 0.002 * scale, 16
        _rewrite_rows(files, "smollm2", add_ve)
        model = tiers.ModelCalibration("smollm2", files["smollm2"]["json"],
                                       tiers.parse_rows(files["smollm2"]["csv"]))
        return tiers.derive([model], shipped)["balanced"]["min_effect_lognll"], model

    effect, model = derived(1.0)
    assert effect == pytest.approx(np.ceil(norm.ppf(0.95) * 0.002 / 4 * 1e5) / 1e5)  # 0.00083
    assert derived(10.0)[0] == pytest.approx(np.ceil(norm.ppf(0.95) * 0.02 / 4 * 1e4) / 1e4)
    # the rows now disagree with calibration.json's VE statistics: recomputation says so
    assert any(p.startswith("smollm2: variance.sigma_delta") for p in tiers.check(model))
    assert recipe.pooled_sd([0.1, 0.2, None], [2, 3, 9]) == pytest.approx(
        np.sqrt((1 * 0.01 + 2 * 0.04) / 3))


def test_calibrate_on_zoo_families_derives_the_module_limit(tiny_gpt2_dir, sonnets_path,
                                                            tmp_path):
    result = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path, "--edits", "normfold_all",
                        "--edits", "prune", "--seeds", "1")
    out = tmp_path / "cal"
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "calibration.json").read_text())
    assert stats["runs"] == ["zoo:normfold_all:0", "zoo:prune:0"]
    by_run = {r["run"]: r for r in stats["per_run"]}
    assert by_run["zoo:normfold_all:0"]["max_abs_change"] < 1e-4  # folded: σ unchanged
    limit = stats["spectral"]["module_change_limit"]
    assert limit["limit"] == pytest.approx(max(0.01, np.ceil(
        2 * limit["largest_null_change"] * 100) / 100))  # computed: no deadband floor
    preset = yaml.safe_load((out / "calibration.yaml").read_text())
    assert preset["guards"]["spectral"]["module_change_limit"] == limit["limit"]
    assert set(stats["top_abs_z"]) == set(stats["runs"])


def test_calibrate_zoo_skips_a_family_the_model_has_no_place_for(tiny_gpt2_dir, sonnets_path,
                                                                 tmp_path, monkeypatch):
    """`--edits zoo` means every family that applies: GPT-2's ungated MLP has no up/down
    pair, so `updown_scale` is skipped with its reason and the rest calibrates. Named on its
    own, the same family is an input error (exit 2, one line)."""
    from invarlock.calibration import zoo_run

    monkeypatch.setattr(zoo_run, "CALIBRATION", ("updown_scale", "prune"))
    result = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path, "--edits", "zoo", "--seeds", "1")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert stats["runs"] == ["zoo:prune:0"]
    assert [s["run"] for s in stats["skipped"]] == ["zoo:updown_scale:0"]
    assert "up/down" in stats["skipped"][0]["reason"]

    (tmp_path / "named").mkdir()
    named = _calibrate(tiny_gpt2_dir, sonnets_path, tmp_path / "named", "--edits",
                       "updown_scale", "--seeds", "1")
    assert named.exit_code == 2
    assert "Traceback" not in named.output and "up/down" in named.output


def test_redecide_applies_the_current_distribution_limits(tmp_path):
    """`false_alarm_rate.py --reuse` decides stored runs under the policy of now: the
    distribution limits too, not only the guards (a limit recalibrated since the run was
    certified changes its flag and its verdict)."""
    from invarlock.calibration.zoo_run import redecide
    from tests.certs import synthetic_certificate

    cert = synthetic_certificate(kld_scale=0.05)
    assert "distribution_acceptable" in cert["gating"]
    bound = cert["distribution"]["kld_mean"]["high"]
    path = tmp_path / "evaluation.cert.json"
    path.write_text(json.dumps(cert))

    def decided(limit: float) -> dict:
        return redecide(path, {"auto": {"tier": "balanced", "profile": "dev",
                                        "allow_underpowered": True},
                               "eval": {"distribution": {"kld_mean_upper": limit,
                                                         "same_top_p_lower": 0.0}}})

    tight, loose = decided(bound / 2), decided(bound * 2)
    assert tight["validation"]["distribution_acceptable"] is False
    assert tight["verdict"]["status"] == "FAIL"
    assert loose["validation"]["distribution_acceptable"] is True


def test_zoo_row_counts_the_primary_metric_apart_from_guards_and_the_evidence_floor():
    from invarlock.calibration.zoo_run import zoo_row

    def cert(primary_ok: bool, spectral_ok: bool) -> dict:
        return {"verdict": {"status": "PASS" if primary_ok and spectral_ok else "FAIL"},
                "primary_metric": {"ratio": 1.01, "ratio_ci": [1.0, 1.02]},
                "guards": {"spectral": {"flag": "spectral_stable", "passed": spectral_ok}},
                "validation": {"primary_metric_acceptable": primary_ok,
                               "evidence_meets_profile": False,
                               "spectral_stable": spectral_ok}}

    small_windows = zoo_row("noise", "benign", 1, cert(True, True))
    assert small_windows["primary_ok"] is True and small_windows["evidence_ok"] is False
    assert small_windows["failing"] == ["evidence_meets_profile"]
    caught_by_spectral = zoo_row("scale3", "harmful", 0, cert(True, False))
    assert caught_by_spectral["primary_ok"] is True and caught_by_spectral["spectral"] is False
    caught_by_primary = zoo_row("rtn4", "harmful", 0, cert(False, True))
    assert caught_by_primary["primary_ok"] is False
    measured = cert(True, True)
    measured["guards"]["spectral"]["measurements"] = {"modules": [
        {"name": "a.weight", "edit_along_data": 0.02}, {"name": "b.weight",
                                                        "edit_along_data": 0.07},
        {"name": "c.weight", "edit_along_data": None}]}
    row = zoo_row("gptq4", "benign", 0, measured)  # the closest module to its limit
    assert row["spectral_max_edit_along_data"] == 0.07
    assert row["spectral_along_data_module"] == "b.weight"


@pytest.mark.parametrize("tier", ["balanced", "conservative", "aggressive"])
def test_shipped_spectral_fails_beyond_the_larger_of_deadband_and_module_limit(tier):
    """The stated design (CALIBRATION.md, design choices): the shipped spectral guard passes
    when every |σ change| is within the deadband and fails when one exceeds the larger of
    deadband and module limit. Where the calibrated limit lies below the deadband (balanced,
    aggressive) that is an exact rule and κ, the family screen and the WARN budget never
    change a verdict; where it lies above (conservative), a change between the two is
    decided by the robust z screen, and both outcomes occur."""
    from invarlock.guards import spectral
    from invarlock.policy import tiers as shipped_tiers

    policy = shipped_tiers()[tier]["guards"]["spectral"]
    deadband = float(policy["deadband"])
    limit = max(deadband, float(policy["module_change_limit"]))
    rng = np.random.default_rng(0)
    outcomes, between = set(), set()
    for trial in range(600):
        n = int(rng.integers(4, 40))
        r = rng.normal(0.0, 10 ** rng.uniform(-4, -0.5), size=n)
        r[rng.random(n) < 0.1] *= rng.uniform(5, 50)  # a few modules far out, sometimes
        r = np.maximum(r, -0.9)  # σ stays positive
        modules = [{"name": f"m{i}", "family": ("attn", "ffn")[i % 2],
                    "sigma_baseline": 1.0, "sigma_subject": 1.0 + float(x)}
                   for i, x in enumerate(r)]
        decision = spectral.decide({"modules": modules, "evaluated": True}, policy)
        largest = float(np.max(np.abs(r)))
        if largest > limit:
            assert not decision.passed, (trial, decision.reason)
        elif largest <= deadband:
            assert decision.passed, (trial, decision.reason)
        else:
            between.add(decision.passed)
        outcomes.add(largest > limit)
    assert outcomes == {True, False}
    assert between == (set() if limit == deadband else {True, False})


def test_the_zoo_calibration_set_leaves_out_half_sparsity_unless_named():
    """`--edits zoo` sizes limits from edits that keep perplexity near the baseline: the
    50% pruning families (PPL ×1.4–1.5 on the demo) only run when named."""
    from invarlock.calibration.runner import reference_edits
    from invarlock.calibration.zoo_run import BENIGN, NOT_IN_SHIPPED_CALIBRATION, UNCALIBRATED

    zoo_labels = {label.split(":")[1] for label, _, _ in reference_edits(("zoo",), 1)}
    assert zoo_labels == set(BENIGN) - set(UNCALIBRATED) - set(NOT_IN_SHIPPED_CALIBRATION)
    assert {"gptq4", "vo_scale", "updown_scale"} <= zoo_labels
    named = reference_edits(("wanda",), 2)
    assert [label for label, _, _ in named] == ["zoo:wanda:0", "zoo:wanda:1"]


def test_every_benign_family_can_be_named_on_the_command_line(tmp_path):
    """A family added to the zoo is a valid `--edits` value at once: the option reaches the
    baseline check (exit 2 on a missing folder), not click's invalid-choice error."""
    from click.testing import CliRunner

    from invarlock.calibration.zoo_run import BENIGN
    from invarlock.cli import main

    for family in BENIGN:
        result = CliRunner().invoke(main, [
            "calibrate", "--baseline", str(tmp_path / "missing"), "--edits", family,
            "--out", str(tmp_path / "cal")])
        assert result.exit_code == 2, (family, result.output)
        assert "Invalid value for '--edits'" not in result.output, family


def test_ve_rescales_that_do_not_move_the_loss_are_left_out_of_the_pool():
    """A function-preserving edit leaves VE's scales at 1 to float rounding: its Δ is rounding,
    which would dilute σ_Δ^VE (and shrink the minimum effect) if pooled. Only runs whose scales
    moved some window's loss by more than `VE_NO_EFFECT` are pooled; the rest are counted."""
    rng = np.random.default_rng(3)
    settings = recipe.Settings(budget=2, windows=16, alpha=0.05, sided="one-sided")

    def rows(run: str, deltas: np.ndarray) -> list[dict]:
        return [{"run": run, "window": i, "tokens": 100, "nll_plain": 300.0,
                 "nll_scaled": 300.0 + 100 * d} for i, d in enumerate(deltas)]

    real = rng.normal(0.0, 1e-3, 16)
    rounding = rng.normal(0.0, 1e-8, 16)
    raw = rows("zoo:prune:0", real) + rows("zoo:normfold_all:0", rounding) + rows(
        "zoo:qk_scale:0", rounding)
    per_run = recipe.ve_per_run(raw)
    assert [r["ve_max_abs_delta"] > recipe.VE_NO_EFFECT for r in per_run] == [
        True, False, False]
    ve = recipe.ve_statistics(per_run, settings)
    assert ve["runs_with_gate"] == 1 and ve["runs_without_effect"] == 2
    assert ve["sigma_delta"] == pytest.approx(np.std(real, ddof=1), rel=1e-6)
    assert ve["one_sided"] == pytest.approx(norm.ppf(0.95) * np.std(real, ddof=1) / 4,
                                            rel=1e-6)
    # rows read from a CSV without the largest |Δ| are pooled as before
    legacy = [{k: v for k, v in r.items() if k != "ve_max_abs_delta"} for r in per_run]
    assert recipe.ve_statistics(legacy, settings)["runs_with_gate"] == 3
