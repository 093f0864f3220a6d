"""The final set evaluated in looks: blocks end exactly at the looks, the run stops at the
first deciding look, the policy's design is validated, and the gate's flag follows the
sequence only when a look decided."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from invarlock import gate
from invarlock import sequential as sq
from invarlock import sequential_run as sr
from invarlock.enums import MetricKind
from invarlock.errors import ConfigError
from invarlock.evaluate import WindowScores
from invarlock.policy import resolve

T = 255  # tokens scored per 256-token causal window


@dataclasses.dataclass(frozen=True)
class _Windows:
    """A WindowSet stand-in with the fields `window_range` cuts."""

    name: str
    window_ids: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: object
    token_type_ids: object
    sha256: tuple

    @property
    def n(self) -> int:
        return int(self.window_ids.shape[0])


def _windows(n: int) -> _Windows:
    return _Windows("final", np.arange(100, 100 + n, dtype=np.int64), np.zeros((n, 4), np.int64),
                    np.ones((n, 4), np.int64), None, None, tuple(f"h{i}" for i in range(n)))


def _scores(values: np.ndarray, ids: np.ndarray) -> WindowScores:
    return WindowScores(kind=MetricKind.PPL_CAUSAL, window_ids=ids,
                        sha256=tuple(f"h{i - 100}" for i in ids),
                        tokens=np.full(len(ids), T, dtype=np.int64), values=values,
                        nonfinite_windows=int(np.count_nonzero(~np.isfinite(values))),
                        seconds=0.0, fed_sha256=tuple(f"h{i - 100}" for i in ids))


def _run(per_token_delta: np.ndarray, design: sq.Design, threshold: float = math.log(1.1)):
    n = len(per_token_delta)
    rng = np.random.default_rng(0)
    base_values = T * rng.normal(4.0, 0.3, n)
    subj_values = base_values + T * per_token_delta
    windows = _windows(n)
    baseline = _scores(base_values, windows.window_ids)
    blocks: list[tuple[int, int]] = []

    def score(ws):
        lo = int(ws.window_ids[0]) - 100
        blocks.append((lo, lo + ws.n))
        return _scores(subj_values[lo:lo + ws.n], ws.window_ids)

    scores, outcome = sr.evaluate_in_looks(score, windows, baseline, MetricKind.PPL_CAUSAL,
                                           design, threshold, sd_floor=0.0)
    return scores, outcome, blocks


DESIGN = sq.Design(alpha=0.05, n_min=32, n_max=200, step=16, share=0.2)


def test_a_clear_pass_scores_only_up_to_n_min():
    rng = np.random.default_rng(1)
    scores, outcome, blocks = _run(rng.normal(0.0, 0.01, 200), DESIGN)
    assert blocks == [(0, 32)]
    assert outcome.early and outcome.result.decision is sq.Decision.PASS
    assert scores.n == outcome.stopped_at == 32
    assert np.array_equal(scores.window_ids, np.arange(100, 132))
    assert outcome.reason.startswith("decided after 32 of 200 windows: PASS")


def test_a_clear_fail_stops_at_its_first_deciding_look():
    rng = np.random.default_rng(2)
    _, outcome, blocks = _run(rng.normal(0.5, 0.05, 200), DESIGN)
    assert blocks == [(0, 32)] and outcome.result.decision is sq.Decision.FAIL


def test_a_borderline_subject_is_scored_in_blocks_ending_at_every_look_to_the_maximum():
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 0.2, 200)
    _, outcome, blocks = _run(x - x.mean() + math.log(1.1), DESIGN)
    looks = DESIGN.looks
    assert blocks == list(zip((0, *looks[:-1]), looks, strict=True))
    assert not outcome.early and outcome.stopped_at == 200
    assert outcome.result.decision is sq.Decision.CONTINUE


def test_differences_are_per_token_log_loss_or_negated_percentage_points():
    tokens = np.array([10, 20])
    x = sr.differences(MetricKind.PPL_CAUSAL, tokens, np.array([10.0, 20.0]),
                       np.array([11.0, 18.0]))
    assert np.allclose(x, [0.1, -0.1])
    acc = sr.differences(MetricKind.ACCURACY, np.ones(3), np.array([1.0, 0.0, 1.0]),
                         np.array([0.0, 0.0, 1.0]))
    assert np.allclose(acc, [100.0, 0.0, 0.0])  # a lost example counts +100 (worse)


def test_a_broken_window_stops_the_looks_and_leaves_the_verdict_to_the_gate():
    x = np.zeros(200)
    x[5] = np.nan
    scores, outcome, blocks = _run(x, DESIGN)
    assert blocks == [(0, 32)] and outcome.result is None and not outcome.early
    assert scores.nonfinite_windows == 1


def _policy(profile: str):
    return resolve({"auto": {"profile": profile}})


def test_the_profiles_turn_it_on_in_dev_and_ci_and_off_in_release():
    assert sr.design_for(_policy("dev"), 64) == sq.Design(0.05, 32, 64, 8, 0.2, 32)
    assert sr.design_for(_policy("ci"), 200) == sq.Design(0.05, 32, 200, 16, 0.2, 32)
    assert sr.design_for(_policy("release"), 400) is None
    on = resolve({"auto": {"profile": "release", "sequential": True}})
    assert sr.design_for(on, 400) == sq.Design(0.05, 64, 400, 32, 0.2, 64)
    off = resolve({"auto": {"profile": "ci", "sequential": False}})
    assert sr.design_for(off, 200) is None


def test_a_set_no_larger_than_n_min_runs_the_fixed_design():
    assert sr.design_for(_policy("dev"), 32) is None


def test_the_preview_is_cut_to_the_profiles_count_and_never_past_the_plan():
    """Only the preview windows the catastrophe check, the VE fit and the σ̂ floor use are
    scored; without a design the whole preview set is."""
    ci = sr.design_for(_policy("ci"), 200, 200)
    assert ci.preview_n == 32 and ci.as_dict()["preview_n"] == 32
    assert sr.preview_needed(ci, 200) == 32
    assert sr.design_for(_policy("dev"), 64, 20).preview_n == 20  # a shrunk plan
    assert sr.preview_needed(None, 200) == 200
    assert sr.final_needed_first(ci, 200) == 32 and sr.final_needed_first(None, 200) == 200


@pytest.mark.parametrize("values, message", [
    ({"n_min": 10}, "n_min must be an integer >= 25"),
    ({"n_min": 30}, "below guards.calibration_windows"),
    ({"enabled": "yes"}, "true or false"),
    ({"alpha_share": 1.5}, "share"),
    ({"preview_n": 1}, "preview_n must be an integer >= 2"),
])
def test_bad_sequential_policies_are_named(values, message):
    policy = resolve({"auto": {"profile": "ci"}})
    values_ = {**policy.values, "sequential": {**policy.values["sequential"], **values},
               "guards": {**policy.values["guards"], "calibration_windows": 32}}
    bad = type(policy)(policy.tier, policy.profile, values_, policy.overrides)
    with pytest.raises(ConfigError, match=message):
        sr.design_for(bad, 200)


def _pm(ratio_hi: float) -> gate.PrimaryMetricResult:
    from invarlock.stats import BootstrapInterval

    iv = BootstrapInterval(estimate=0.0, low=-0.1, high=math.log(ratio_hi), method="bca",
                           replicates=10, seed=0, alpha=0.04, alpha_effective=0.04, z0=0.0,
                           acceleration=0.0)
    s = gate.SetSummary(10.0, 10.0, 1.0)
    return gate.PrimaryMetricResult(MetricKind.PPL_CAUSAL, s, s, False, iv, 1.1,
                                    "ratio_ci_upper")


def test_a_deciding_look_sets_the_primary_flag_and_an_undecided_one_leaves_it_to_bca():
    policy = resolve({"auto": {"profile": "ci"}}).primary_metric
    rng = np.random.default_rng(4)
    early = sr.sequence(DESIGN, math.log(1.1), 0.0, rng.normal(0.0, 0.01, 32))
    flags = {c.flag: c for c in sr.primary_checks(_pm(1.2), policy, early)}
    assert flags["primary_metric_acceptable"].passed
    assert "decided after 32 of 200" in flags["primary_metric_acceptable"].reason
    x = rng.normal(0.0, 0.2, 200)
    late = sr.sequence(DESIGN, math.log(1.1), 0.0, x - x.mean() + math.log(1.1))
    assert not late.early
    flags = {c.flag: c for c in sr.primary_checks(_pm(1.2), policy, late)}
    assert not flags["primary_metric_acceptable"].passed  # the fixed interval decides


def test_the_fixed_interval_runs_at_the_alpha_the_sequence_left():
    boot = resolve({"auto": {"profile": "ci"}}).bootstrap
    assert sr.fixed_bootstrap(boot, DESIGN).alpha == pytest.approx(0.04)
    assert sr.fixed_bootstrap(boot, None) is boot


def test_the_baselines_cached_results_are_cut_to_the_windows_evaluated():
    from invarlock.cache import CachedScores

    cached = CachedScores(window_ids=np.arange(5), sha256=tuple("abcde"),
                          tokens=np.full(5, T), values=np.arange(5.0),
                          fed_sha256=tuple("abcde"))
    head = sr.head_scores(cached, 3)
    assert list(head.window_ids) == [0, 1, 2] and head.fed_sha256 == ("a", "b", "c")
    assert sr.head_scores(cached, 5) is cached


@pytest.mark.parametrize("blocks", [False, True], ids=["by-memory", "one-model-at-a-time"])
def test_several_subjects_each_stop_on_their_own_and_every_certificate_verifies(
        tiny_gpt2_dir, sonnets_path, tmp_path, monkeypatch, blocks):
    """One baseline evaluation serves subjects whose sequences stop at different looks, with
    both models resident or one at a time (each subject read again from its path after a
    baseline block it needed)."""
    import json

    from click.testing import CliRunner

    from invarlock.certificate import document
    from invarlock.cli import main
    from invarlock.models import device
    from invarlock.verify import verify_certificate
    from tests.test_certify_cli import _scaled_copy

    if blocks:
        monkeypatch.setattr(device, "free_memory", lambda _device: 0)

    same = __import__("shutil").copytree(tiny_gpt2_dir, tmp_path / "same")
    broken = _scaled_copy(tiny_gpt2_dir, tmp_path / "broken", 1.3)
    preset = tmp_path / "seq.yaml"
    preset.write_text("dataset: {seq_len: 32, preview_n: 48, final_n: 48}\n"
                      "eval: {bootstrap: {replicates: 200}, "
                      "primary_metric: {catastrophic_ratio: 50.0}}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "certify", "--baseline", str(tiny_gpt2_dir), "--dataset", str(sonnets_path),
        "--profile", "dev", "--preset", str(preset), "--out", str(out), "--no-cache",
        "--subject", str(same), "--subject", str(broken), "--json"], catch_exceptions=False)
    rows = {Path(r["subject"]).name: r for r in json.loads(result.stdout)["subjects"]}
    assert rows["same"]["sequential"] == "decided after 32 of 48 windows (PASS)"
    assert rows["same"]["ci_level"] == 0.96  # the fixed interval at the α the sequence left
    certs = sorted(out.rglob(document.CERT_FILENAME))
    assert len(certs) == 2
    for path in certs:
        cert = json.loads(path.read_text(encoding="utf-8"))
        assert cert["sequential"]["stopped_at"] in (32, 40, 48)
        assert verify_certificate(cert).differences == ()
        if blocks:
            assert cert["baseline"]["schedule"] == "blocks"
            assert cert["baseline"]["final_blocks"][0] == [0, 32]
            assert cert["baseline"]["final_blocks"][-1][1] >= cert["sequential"]["stopped_at"]


def test_the_sigma_floor_is_an_upper_confidence_bound_on_the_preview_spread():
    """s·√((n−1)/χ²₀.₀₅(n−1)): 1.268 × s for the 32 preview windows of ci and dev."""
    x = np.random.default_rng(4).normal(0.0, 0.05, 32)
    ones = np.ones(32)
    floor = sr.preview_floor(MetricKind.PPL_CAUSAL, ones, np.zeros(32), x)
    assert floor == pytest.approx(1.2680049 * x.std(ddof=1), rel=1e-6)
    assert sr.preview_floor(MetricKind.PPL_CAUSAL, ones[:1], np.zeros(1), x[:1]) == 0.0
