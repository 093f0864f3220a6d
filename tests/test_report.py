"""`invarlock report`: Markdown, self-contained HTML and JSON renderings of a certificate."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from invarlock import report
from invarlock.cli import main
from invarlock.enums import MetricKind
from invarlock.errors import TamperedCertificateError
from invarlock.report import charts
from invarlock.report.html import module_scores, window_deltas
from tests.certs import synthetic_certificate
from tests.guard_sections import rmt_section, spectral_section, with_guard_sections


class _Tags(HTMLParser):
    """Every start tag with its attributes, and whether tags close in order."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr", "circle", "line", "rect",
                      "path"})

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()


def parse(page: str) -> _Tags:
    tags = _Tags()
    tags.feed(page)
    return tags


@pytest.fixture(scope="module")
def failing_with_guards() -> dict:
    return with_guard_sections(synthetic_certificate(shift=0.2, seed=2),
                               {"spectral": spectral_section(), "rmt": rmt_section()})


def test_html_is_one_self_contained_well_formed_page(failing_with_guards):
    page = report.render(failing_with_guards, "html")
    tags = parse(page)
    assert tags.errors == [] and tags.stack == []
    names = {t for t, _ in tags.tags}
    assert not names & {"script", "link", "img", "iframe", "object", "embed"}
    for _, attrs in tags.tags:
        assert "src" not in attrs and "href" not in attrs
    assert "url(" not in page and "@import" not in page
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"] * page.count(
        "<svg ")


def test_html_puts_the_verdict_first_then_the_evidence(failing_with_guards):
    page = report.render(failing_with_guards, "html")
    order = [page.index(s) for s in ("✘ FAIL", "Primary metric", "Per-window differences",
                                     "Gates", "Guards", "Policy", "provenance")]
    assert order == sorted(order)
    assert "limit 1.10" in page and "interval" in page
    assert "Histogram of per-window log-loss differences" in page
    assert 'aria-label="spectral: |z| per module"' in page
    assert "Findings: attn" in page and "edge_subject" in page


def test_html_says_when_a_certificate_does_not_verify(failing_with_guards):
    cert = {**failing_with_guards, "digest": "sha256:" + "0" * 64}
    page = report.render(cert, "html")
    assert "does not verify" in page and "edited after it was sealed" in page


@pytest.mark.parametrize(("kind", "shift", "expected"), [
    (MetricKind.ACCURACY, 0.0, "Paired outcomes on the final set"),
    (MetricKind.PPL_CAUSAL, 1.5, "No interval: the final set was not evaluated"),
    (MetricKind.PPL_MLM, 0.0, "Perplexity ratio subject/baseline"),
])
def test_html_renders_every_kind_of_certificate(kind, shift, expected):
    cert = synthetic_certificate(kind=kind, shift=shift, n=40, seed=8)
    page = report.render(cert, "html")
    assert expected in page
    assert "No guard results in this certificate." in page
    assert parse(page).errors == []


def test_interval_plot_places_estimate_inside_its_interval_and_marks_the_limit():
    svg = charts.interval_plot(estimate=1.05, low=1.02, high=1.08, limit=1.10, reference=1.0,
                               upper_limit=True, passed=True, label="x")
    scale = charts.Scale(1.0 - 0.025, 1.10 + 0.025, 40, 680)  # range ± 25% padding
    cx = float(re.search(r'<circle cx="([\d.]+)"', svg).group(1))
    assert cx == pytest.approx(scale(1.05), abs=0.1)
    ends = [float(x) for x in re.findall(r'<line x1="([\d.]+)" y1="52"', svg)]
    assert ends == [pytest.approx(scale(1.02), abs=0.1), pytest.approx(scale(1.08), abs=0.1)]
    assert "limit 1.10" in svg and "1.0500" in svg


def test_histogram_counts_every_value():
    values = [0.0, 0.1, 0.1, 0.2, 0.3, 0.3, 0.3]
    svg = charts.histogram(values, label="h", x_label="x", bins=3)
    counts = [int(n) for n in re.findall(r": (\d+)</title></rect>", svg)]
    assert sum(counts) == len(values)


def test_nice_ticks_cover_the_range_with_round_steps():
    assert charts.nice_ticks(0.0, 1.0, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = charts.nice_ticks(0.97, 1.13, 6)
    assert ticks == [1.0, 1.05, 1.1]


def test_window_deltas_are_per_token_differences():
    cert = synthetic_certificate(shift=0.05, n=16, seed=9)
    name, deltas = window_deltas(cert)
    final = cert["windows"]["final"]
    assert name == "final" and len(deltas) == 16
    assert deltas[3] == pytest.approx((final["subject"][3] - final["baseline"][3])
                                      / final["tokens"][3])


def test_module_scores_accept_lists_or_mappings_and_take_family_caps():
    section = spectral_section(modules=6, violations=1)
    bars = module_scores(section, {})
    assert len(bars) == 6 and bars[0].threshold == 2.8 and bars[0].value > 2.8
    assert [b.flagged for b in bars] == [True] + [False] * 5  # the one in the findings
    as_map = {"measurements": {"modules": {"a.q_proj": {"family": "attn", "abs_z": 1.5}}}}
    assert [(b.label, b.value, b.threshold) for b in module_scores(
        as_map, {"family_caps": {"attn": 2.0}})] == [("a.q_proj", 1.5, 2.0)]
    assert module_scores({"measurements": {"edge": 1.0}}, {}) == []


def test_markdown_and_json_carry_the_verification():
    cert = synthetic_certificate(shift=0.0, seed=1)
    text = report.render(cert, "md")
    assert text.startswith("# ✅ InvarLock certificate: PASS")
    assert "## Verification" in text and "Verified:" in text
    summary = json.loads(report.render(cert, "json"))
    assert summary["verdict"] == "PASS" and summary["verification"]["verified"] is True
    assert {g["flag"] for g in summary["gates"]} == set(cert["validation"])
    assert summary["primary_metric"]["ratio_ci"] == cert["primary_metric"]["ratio_ci"]


def test_a_malformed_certificate_is_refused():
    cert = synthetic_certificate(seed=1)
    del cert["primary_metric"]
    with pytest.raises(TamperedCertificateError, match="malformed"):
        report.render(cert, "html")


def test_cli_writes_the_format_its_suffix_names(tmp_path: Path):
    cert_path = tmp_path / "c.json"
    cert_path.write_text(json.dumps(synthetic_certificate(shift=0.2, seed=2)))
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(cert_path), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    result = runner.invoke(main, ["report", str(cert_path), "--format", "json"])
    assert json.loads(result.stdout)["verdict"] == "FAIL"
    result = runner.invoke(main, ["report", str(cert_path)])
    assert result.stdout.startswith("# ❌ InvarLock certificate: FAIL")


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "certificate not found" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "invarlock.certificate"}))
    result = runner.invoke(main, ["report", str(bad), "--format", "html"])
    assert result.exit_code == 2 and "malformed" in result.stderr
    assert "Traceback" not in result.stderr


# --- the spectral chart plots what decides ---------------------------------------------------

def _spectral_policy() -> dict:
    """The certificate's spectral policy with κ = 1.5 in every family: low enough that
    quantization noise's robust z exceeds it, which must still not make a bar cross."""
    from tests.certs import synthetic_certificate

    policy = synthetic_certificate(shift=0.0, seed=1)["policy"]["values"]["guards"]["spectral"]
    return {**policy, "family_caps": {f: 1.5 for f in policy["family_caps"]}}


def _sigma_section(changes: dict[str, float], policy: dict) -> dict:
    """A spectral section as the guard writes it: σ per module, findings from `decide`."""
    from invarlock.families import family_of
    from invarlock.guards import spectral

    modules = [{"name": name, "family": str(family_of(name)), "sigma_baseline": 2.0,
                "sigma_subject": 2.0 * (1.0 + r), "edit_size": abs(r)}
               for name, r in changes.items()]
    decision = spectral.decide({"evaluated": True, "modules": modules}, policy)
    return {"mode": "gate", "flag": "spectral_stable", "passed": decision.passed,
            "reason": decision.reason, "measurements": {"evaluated": True, "modules": modules},
            "summary": decision.summary, "findings": list(decision.findings)}


def _changes(case: str) -> dict[str, float]:
    rng = np.random.default_rng(7)
    out = {}
    for block in range(8):
        for leaf, scale in (("attn.c_attn", 1e-3), ("attn.c_proj", 1e-3),
                            ("mlp.c_fc", 1e-3), ("mlp.c_proj", 1e-3)):
            out[f"transformer.h.{block}.{leaf}.weight"] = float(rng.normal(0, scale))
    out["transformer.wte.weight"] = 2e-4
    if case == "one blown-up layer":
        out["transformer.h.3.mlp.c_fc.weight"] = 0.6
    elif case == "whole family scaled":
        for block in range(8):
            out[f"transformer.h.{block}.attn.c_attn.weight"] = 0.5 + rng.normal(0, 1e-3)
    elif case == "small family changed":
        out["transformer.wte.weight"] = 0.15
    return out


@pytest.mark.parametrize("case", ["quantization noise", "one blown-up layer",
                                  "whole family scaled", "small family changed"])
def test_spectral_bars_cross_their_tick_exactly_where_the_guard_flags(case):
    """A bar past its tick is a module the guard flags (candidate or violation); every other
    bar stays short of its tick. With quantization noise the guard says "no violation" and
    no bar crosses, though some modules' |z| exceed the family κ the old chart drew."""
    from invarlock.report.html import spectral_changes

    policy = _spectral_policy()
    section = _sigma_section(_changes(case), policy)
    bars = spectral_changes(section, policy)
    assert len(bars) == len(_changes(case))
    flagged = {f["module"] for f in section["findings"]}
    assert {b.label for b in bars if b.value > b.threshold} == flagged
    assert {b.label for b in bars if b.flagged} == {
        f["module"] for f in section["findings"] if f["kind"] == "violation"}
    if case == "quantization noise":
        assert section["passed"] and not flagged
        z_bars = module_scores(section, policy)
        assert sum(b.value > policy["family_caps"][b.group] for b in z_bars) >= 2
    else:
        assert not section["passed"] and flagged


def test_spectral_chart_in_the_page_is_the_change_chart():
    from invarlock import report
    from tests.certs import synthetic_certificate

    cert = synthetic_certificate(shift=0.0, seed=1)
    policy = cert["policy"]["values"]["guards"]["spectral"]
    cert = with_guard_sections(cert, {"spectral": _sigma_section(_changes("quantization noise"),
                                                                 policy)})
    page = report.render(cert, "html")
    assert "|σ change| per module against its limit" in page
    assert "family cap κ" not in page


def test_every_table_scrolls_inside_the_page():
    """Wide tables (spectral and RMT per family) scroll in their own box, never the page."""
    from invarlock import report
    from tests.certs import synthetic_certificate

    page = report.render(with_guard_sections(synthetic_certificate(shift=0.2, seed=2)), "html")
    assert page.count("<table") >= 3
    assert page.count("<table") == page.count('<div class="scroll"><table')
    assert ".scroll { overflow-x: auto" in page


@pytest.fixture(scope="module")
def sequential_pages() -> dict[str, str]:
    cases = {"pass": dict(shift=0.0, n=200, seed=11), "max": dict(shift=0.0953, n=64, seed=7)}
    return {name: report.render(synthetic_certificate(sequential=True, **kw), "html")
            for name, kw in cases.items()}


def _looks_table(page: str) -> list[list[str]]:
    section = page[page.index("<h2>Sequential test</h2>"):page.index("<h2>Per-window")]
    table = section[section.index("<table"):section.index("</table>")]
    return [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in table.split("<tr>")[2:]]


def test_html_shows_an_early_stop_with_its_bounds_plot_and_looks(sequential_pages):
    page = sequential_pages["pass"]
    assert parse(page).errors == []
    order = [page.index(f"<h2>{s}") for s in ("Primary metric", "Sequential test", "Per-window")]
    assert order == sorted(order)
    assert "<strong>Decided after 32 of 200 windows (PASS).</strong>" in page
    assert 'aria-label="Confidence sequence bounds over the looks' in page
    assert "stopped at 32: PASS" in page and "not evaluated" in page
    assert "ln 1.10 = +0.0953" in page
    assert [row[:2] + row[-1:] for row in _looks_table(page)] == [["1", "32", "pass"]]
    # the histogram draws the 32 windows evaluated, not the 200 planned
    assert "32 final windows evaluated (of 200 planned" in page
    assert len(window_deltas(synthetic_certificate(shift=0.0, n=200, seed=11,
                                                   sequential=True))[1]) == 32


def test_html_of_a_run_to_the_maximum_lists_every_look(sequential_pages):
    page = sequential_pages["max"]
    assert "Ran to the maximum of 64 windows undecided" in page
    assert [row[1] for row in _looks_table(page)] == ["32", "40", "48", "56", "64"]
    assert "maximum 64: fixed interval decides" in page and "not evaluated" not in page
    assert "64 final windows evaluated;" in page


def test_bounds_plot_draws_each_look_between_its_bounds_and_the_threshold_across():
    looks = [charts.BoundsLook(32, 0.09, 0.05, 0.13, "continue"),
             charts.BoundsLook(48, 0.02, 0.00, 0.04, "pass")]
    svg = charts.bounds_plot(looks, threshold=0.0953, threshold_label="ln 1.10",
                             maximum=200, planned=[32, 48, 64, 200], stop_label="stopped",
                             label="b", y_label="Δ")
    bars = re.findall(r'<line x1="([\d.]+)" y1="([\d.]+)" x2="\1" y2="([\d.]+)" '
                      r'stroke="#[0-9a-f]+" stroke-width="3">', svg)
    assert len(bars) == 2
    (x1, lo1, hi1), (x2, lo2, hi2) = [tuple(map(float, b)) for b in bars]
    assert x1 < x2 and lo2 - hi2 < lo1 - hi1  # narrower at the later look (pixels grow down)
    y_thr = float(re.search(r'y1="([\d.]+)" x2="[\d.]+" y2="\1" stroke="#cf222e"', svg)
                  .group(1))
    assert hi1 < y_thr < lo1 and y_thr < hi2  # crossed by look 1, above look 2 on screen
    assert svg.count('r="2" fill=') == 4 and "not evaluated" in svg


def test_html_of_a_classifier_that_stopped_early_counts_the_examples_evaluated():
    cert = synthetic_certificate(kind=MetricKind.ACCURACY, n=96, seed=4, sequential=True)
    page = report.render(cert, "html")
    assert parse(page).errors == []
    assert "Paired outcomes on the final set (32 examples evaluated (of 96 planned" in page
    assert "<strong>Decided after 32 of 96 windows (PASS).</strong>" in page
    assert "limit -1.00 pp" in page
