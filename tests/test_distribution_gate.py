"""The distribution limits' part in the verdict (invarlock.distribution_gate): monitor-only
without a limit, a named reason when a bound crosses one, gating only where set and measured,
and a shortfall when a limited run measured nothing."""

from __future__ import annotations

import pytest

from invarlock import distribution_gate as dg
from invarlock import gate


def _stored(kld_high: float, top_low: float, p99: float) -> dict:
    return {"kld_mean": {"estimate": kld_high / 2, "low": 0.0, "high": kld_high},
            "same_top_p": {"estimate": min(1.0, top_low + 0.01), "low": top_low, "high": 1.0},
            "kld": {"median": p99 / 10, "p99": p99}}


def test_without_limits_every_quantity_is_monitor_only_and_the_flag_holds():
    records = dg.checks(_stored(5.0, 0.1, 50.0), dg.Limits())
    assert [r["status"] for r in records] == ["monitor"] * 3
    assert not dg.Limits().gates and dg.gating(dg.Limits(), measured=True) == ()
    check = dg.check(records)
    assert check.flag == dg.FLAG and check.passed
    assert "monitor-only" in check.reason and "mean KLD upper bound" in check.reason


def test_a_bound_beyond_its_limit_fails_with_a_named_reason():
    limits = dg.Limits(kld_mean_upper=0.03, same_top_p_lower=0.9)
    records = dg.checks(_stored(0.041, 0.95, 0.2), limits)
    assert [r["status"] for r in records] == ["fail", "pass", "monitor"]
    check = dg.check(records)
    assert not check.passed
    assert "mean KLD upper bound 0.041 > limit 0.03" in check.reason
    assert "same top p lower bound 95.00% >= limit 90.00%" in check.reason
    decision = gate.decide([check], dg.gating(limits, measured=True))
    assert decision.verdict == "FAIL"
    assert decision.reasons == (f"{dg.FLAG}: {check.reason}",)


def test_agreement_below_its_limit_and_the_percentile_fail_too():
    limits = dg.Limits(same_top_p_lower=0.9, kld_p99_upper=0.5)
    records = dg.checks(_stored(0.01, 0.89, 0.6), limits)
    assert [r["status"] for r in records] == ["monitor", "fail", "fail"]
    assert "same top p lower bound 89.00% < limit 90.00%" in dg.check(records).reason
    at_limit = dg.checks(_stored(0.03, 0.9, 0.5), dg.Limits(0.03, 0.9, 0.5))
    assert {r["status"] for r in at_limit} == {"pass"}  # a bound equal to its limit passes


def test_the_flag_gates_only_where_a_limit_is_set_and_the_run_measured_it():
    limits = dg.Limits(kld_mean_upper=0.03)
    assert dg.gating(limits, measured=True) == (dg.FLAG,)
    assert dg.gating(limits, measured=False) == ()
    # not measured under a limit: a shortfall of the evidence (gating in release), not silence
    assert dg.shortfall(limits, measured=False, language_model=True)
    assert dg.shortfall(limits, measured=True, language_model=True) == ()
    assert dg.shortfall(limits, measured=False, language_model=False) == ()  # a classifier
    assert dg.shortfall(dg.Limits(), measured=False, language_model=True) == ()


def test_limits_read_from_the_policy_section():
    limits = dg.Limits.from_policy({"kld_mean_upper": 0.02, "same_top_p_lower": None})
    assert limits == dg.Limits(kld_mean_upper=0.02) and limits.gates
    assert limits.as_dict() == {"kld_mean_upper": 0.02, "same_top_p_lower": None,
                                "kld_p99_upper": None}
    assert dg.Limits.from_policy(None) == dg.Limits()


@pytest.mark.parametrize("key", dg.KEYS)
def test_a_preset_that_loosens_a_shipped_limit_is_a_shortfall_of_the_evidence(key):
    """Like every other limit: looser than the tier's (a higher KLD ceiling, a lower
    agreement floor) is listed as a weakened setting; stricter is not."""
    from invarlock.policy import resolve, tiers

    shipped = tiers()["balanced"]["distribution"][key]
    ceiling = key != "same_top_p_lower"
    for factor, weaker in ((0.5, not ceiling), (1.5, ceiling)):
        value = min(1.0, (shipped or 0.5) * factor)
        policy = resolve({"auto": {"tier": "balanced", "profile": "dev"},
                          "eval": {"distribution": {key: value}}})
        assert policy.values["distribution"][key] == value
        listed = any(w.startswith(f"distribution.{key}") for w in policy.weakened)
        # without a shipped limit (monitor-only) no value is weaker than the tier
        assert listed is (weaker and shipped is not None), (key, value)


def test_renderings_say_which_quantities_gate_and_which_are_monitored():
    from invarlock import report
    from invarlock.certificate import markdown
    from tests.certs import synthetic_certificate

    cert = synthetic_certificate(seed=6, kld_scale=0.05)
    assert cert["verdict"]["status"] == "FAIL" and dg.FLAG in cert["gating"]
    from invarlock.verify import verify_certificate

    assert verify_certificate(cert).differences == ()  # built as certify builds it
    text = markdown.render(cert)
    assert "| Mean KLD (CI upper bound) | " in text and "| gate | ❌ fail |" in text
    assert "| 99.0% KLD | " in text and "| monitor | no calibrated limit |" in text
    assert "<td>gate</td>" in report.render(cert, "html")
    # the same evidence under a tier without limits: every quantity monitor-only
    d = cert["distribution"]
    monitored = {**cert, "gating": [g for g in cert["gating"] if g != dg.FLAG],
                 "distribution": {**d, "checks": [dict(c, limit=None, status="monitor")
                                                  for c in d["checks"]]}}
    text = markdown.render(monitored)
    assert "Monitor-only: no tier limit gates the distribution evidence" in text
    assert "| gate |" not in text.split("## Distribution evidence")[1]
