"""Distribution evidence through the pipeline: every language-model run records it, a cached
baseline gives the same KL divergence as a cold run, the certificate shows it, and `verify`
recomputes it and catches edits."""

from __future__ import annotations

import copy
import json

import pytest

from invarlock.certificate import document, markdown
from invarlock.verify import verify_certificate
from tests.test_certify_cli import certify


@pytest.fixture(scope="module")
def runs(tiny_gpt2_dir, sonnets_path, tmp_path_factory):
    """The same edit certified twice against one baseline cache: cold, then from the cache."""
    tmp = tmp_path_factory.mktemp("dist")
    preset = tmp / "fast.yaml"
    preset.write_text("dataset: {seq_len: 64, preview_n: 12, final_n: 12}\n"
                      "eval: {bootstrap: {replicates: 200}}\n"
                      "edit: {name: quant_rtn, plan: {bitwidth: 4}}\n")
    args = ["--baseline", str(tiny_gpt2_dir), "--dataset", str(sonnets_path), "--profile",
            "dev", "--preset", str(preset)]
    cache = tmp / "cache"
    certs = []
    for name in ("cold", "cached"):
        code, out, err = certify(*args, "--out", str(tmp / name), cache=cache)
        assert code in (0, 1), err
        certs.append(document.load_certificate(out["certificate"]))
    return certs, cache


def test_a_cached_baseline_gives_the_same_kld_as_a_cold_run(runs):
    (cold, cached), cache = runs
    assert cold["baseline"]["results_from_cache"] is False
    assert cached["baseline"]["results_from_cache"] is True
    assert cold["distribution"] == cached["distribution"]
    d = cold["distribution"]
    assert d["set"] == "final" and d["tokens"] == sum(cold["windows"]["final"]["tokens"])
    assert d["kld_mean"]["estimate"] > 0 and 0 < d["same_top_p"]["estimate"] <= 1
    assert d["kld_mean"]["low"] <= d["kld_mean"]["estimate"] <= d["kld_mean"]["high"]
    # the entry holds the compact distribution of both sets, within 2 KiB per scored token
    entry = next(cache.rglob("*.json"))
    payload = json.loads(entry.read_text())["payload"]
    tokens = sum(sum(payload["sets"][s]["tokens"]) for s in ("preview", "final"))
    assert set(payload["distribution"]) == {"preview", "final"}
    assert len(json.dumps(payload["distribution"])) / tokens <= 2048


def test_the_markdown_shows_the_distribution_as_llama_cpp_names_it(runs):
    (cold, _), _ = runs
    rendered = markdown.render(cold)
    for label in ("## Distribution evidence", "| Mean KLD |", "| 99.9% KLD |",
                  "| Maximum KLD |", "| Same top p |", "| RMS Δp |",
                  "Gated by the tier: Mean KLD (CI upper bound), Same top p (CI lower bound)",
                  "| Mean KLD (CI upper bound) |", "| 99.0% KLD | "):
        assert label in rendered
    assert "| gate |" in rendered and "| monitor | no calibrated limit |" in rendered


def test_the_html_report_plots_the_kld_distribution(runs):
    from invarlock import report

    (cold, _), _ = runs
    page = report.render(cold, "html")
    section = page[page.index("<h2>Distribution evidence</h2>"):]
    assert "Histogram of per-token KL divergence" in section and "<rect" in section
    assert "Same top p" in section and "Gated by the tier" in section
    assert "<td>gate</td>" in section and "<td>monitor</td>" in section


def test_the_pr_comment_carries_the_distribution_section(runs):
    from invarlock.enums import Verdict
    from invarlock.github import render
    from invarlock.github.outcome import Outcome
    from tests.github.golden_cases import LINKS

    (cold, _), _ = runs
    outcome = Outcome(0, Verdict(cold["verdict"]["status"]), cold, None, None)
    parts = render.sections(render.Report("InvarLock", outcome, LINKS))
    shown = [p for p in parts if p.startswith("#### Distribution evidence")]
    assert len(shown) == 1 and "| Same top p |" in shown[0]


def _reseal(cert: dict) -> dict:
    body = {k: v for k, v in cert.items() if k != "digest"}
    return {**body, "digest": document.content_digest(body)}


def test_verify_recomputes_the_distribution_and_catches_edits(runs):
    (cold, _), _ = runs
    report = verify_certificate(cold)
    assert report.verified and "distribution" in report.checked, report.differences
    edited = copy.deepcopy(cold)
    edited["distribution"]["windows"]["kld"][0] *= 0.5
    report = verify_certificate(_reseal(edited))
    assert not report.verified
    assert any(d.startswith("distribution.kld_mean") for d in report.differences)
    edited = copy.deepcopy(cold)
    edited["distribution"]["same_top_p"]["low"] = 0.999
    report = verify_certificate(_reseal(edited))
    assert any(d.startswith("distribution.same_top_p.low") for d in report.differences)
    edited = copy.deepcopy(cold)
    edited["distribution"]["limits"]["kld_mean_upper"] = 1.0
    report = verify_certificate(_reseal(edited))
    assert any(d.startswith("distribution.limits") for d in report.differences)


def test_the_tier_limits_gate_the_verdict_and_verify_decides_them_again(runs):
    """Balanced sets both limits: the flag gates, its record names limit, bound and outcome,
    and a tampered limit, bound, outcome or gating list is caught by verify."""
    from invarlock.policy import tiers

    (cold, _), _ = runs
    d = cold["distribution"]
    shipped = tiers()["balanced"]["distribution"]
    assert d["limits"] == shipped and "distribution_acceptable" in cold["gating"]
    by_name = {c["name"]: c for c in d["checks"]}
    assert by_name["kld_mean"]["limit"] == shipped["kld_mean_upper"]
    assert by_name["kld_mean"]["bound"] == d["kld_mean"]["high"]
    assert by_name["kld_mean"]["status"] == (
        "pass" if d["kld_mean"]["high"] <= shipped["kld_mean_upper"] else "fail")
    assert by_name["kld_p99"]["status"] == "monitor"
    assert cold["validation"]["distribution_acceptable"] is all(
        c["status"] != "fail" for c in d["checks"])
    assert "mean KLD upper bound" in cold["verdict"]["explanations"]["distribution_acceptable"]

    def tampered(change) -> list[str]:
        edited = copy.deepcopy(cold)
        change(edited)
        report = verify_certificate(_reseal(edited))
        assert not report.verified
        return report.differences

    def loosen(c):
        c["distribution"]["limits"]["kld_mean_upper"] = 100.0
        c["distribution"]["checks"][0].update(limit=100.0, status="pass")
    assert any(x.startswith("distribution.limits") for x in tampered(loosen))

    def lower_bound(c):
        c["distribution"]["kld_mean"]["high"] = 0.0
        c["distribution"]["checks"][0]["bound"] = 0.0
    assert any(x.startswith("distribution.kld_mean.high") for x in tampered(lower_bound))

    def flip(c):
        c["distribution"]["checks"][0]["status"] = (
            "fail" if c["distribution"]["checks"][0]["status"] == "pass" else "pass")
    assert any(x.startswith("distribution.checks") for x in tampered(flip))

    def ungate(c):
        c["gating"].remove("distribution_acceptable")
    assert any(x.startswith("gating") for x in tampered(ungate))
