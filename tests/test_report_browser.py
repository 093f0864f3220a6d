"""The HTML report in a real headless browser: it loads from one file, asks the network for
nothing, logs no console error, fits the page width and draws its charts.

Skipped when no Chromium binary is installed (Debian: `apt-get install chromium`; or point
INVARLOCK_CHROMIUM at one). `scripts/check_report_browser.py` runs the same checks by hand
and saves a screenshot.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from invarlock import report
from invarlock.enums import MetricKind
from tests.certs import synthetic_certificate
from tests.guard_sections import with_guard_sections

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_report_browser.py"
_spec = importlib.util.spec_from_file_location("check_report_browser", _SCRIPT)
browser = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, browser)  # dataclasses look their module up by name
_spec.loader.exec_module(browser)

# CI (.ci/run) installs Chromium and sets INVARLOCK_REQUIRE_BROWSER=1: there, a missing
# browser fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    browser.find_browser() is None and not os.environ.get("INVARLOCK_REQUIRE_BROWSER"),
    reason="no Chromium binary (apt-get install chromium)")

CASES = {
    "fail-with-guards": (lambda: with_guard_sections(synthetic_certificate(shift=0.2, seed=2)),
                         "FAIL", 3),
    "catastrophic": (lambda: synthetic_certificate(shift=1.5, seed=3), "FAIL", 1),
    "accuracy": (lambda: synthetic_certificate(kind=MetricKind.ACCURACY, n=64, seed=4),
                 "PASS", 1),
    # interval, bounds over the looks, histogram of the windows evaluated
    "sequential-early-pass": (lambda: synthetic_certificate(n=200, seed=11, sequential=True),
                              "PASS", 3),
    "sequential-to-maximum": (lambda: synthetic_certificate(shift=0.0953, n=64, seed=7,
                                                            sequential=True), "FAIL", 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_report_renders_verdict_charts_and_tables_in_chromium(case, tmp_path):
    build, verdict, charts = CASES[case]
    page = tmp_path / "report.html"
    page.write_text(report.render(build(), "html"), encoding="utf-8")
    shot = tmp_path / "shot.png"
    result = browser.check_page(page, screenshot=shot)
    assert result.problems() == []
    assert result.requests == [page.resolve().as_uri()]
    assert result.title == f"InvarLock certificate: {verdict}"
    assert result.text.lstrip().startswith(("✔ " if verdict == "PASS" else "✘ ") + verdict)
    assert result.svg_count == charts and result.drawn_charts == charts  # laid out, with shapes
    assert len(result.tables) >= 3 and all(rows > 0 for rows in result.tables)
    assert "Gates" in result.text or "Check" in result.text
    width, height, pixels = browser.png_pixels(shot)
    assert width == browser.WIDTH and height > 1200  # the whole page, not the viewport
    assert len(set(pixels)) > 64  # painted: a blank page filters to a handful of byte values


def test_screenshot_checker_tells_a_blank_page_from_a_report(tmp_path):
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><head><title>x</title></head><body></body></html>")
    shot = tmp_path / "blank.png"
    result = browser.check_page(page, screenshot=shot)
    assert result.drawn_charts == 0 and result.tables == []
    _, _, pixels = browser.png_pixels(shot)
    assert len(set(pixels)) <= 8  # filtered scanlines of one flat colour: nothing painted


def test_the_checker_sees_network_requests_and_console_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title>'
                    '<link rel="stylesheet" href="http://127.0.0.1:9/style.css"></head>'
                    "<body><script>console.error('boom')</script></body></html>")
    result = browser.check_page(page, settle_s=2.0)  # time for the failed request to show
    problems = result.problems()
    assert any("127.0.0.1:9/style.css" in p for p in problems)
    assert any("boom" in p for p in problems)


def _wide_certificate():
    """Guard sections whose per-family tables carry many columns, as real ones do."""
    from invarlock.guards import spectral
    from tests.test_report import _changes, _sigma_section

    cert = synthetic_certificate(shift=0.0, seed=1)
    policy = cert["policy"]["values"]["guards"]["spectral"]
    section = _sigma_section(_changes("one blown-up layer"), policy)
    for info in section["summary"]["families"].values():
        info.update(top_module="transformer.h.11.mlp.down_proj.weight.with.a.long.name",
                    p_value_bonferroni_adjusted_over_families=0.0123456789)
    rmt_families = {f: {f"edge_ratio_window_{i}": 1.0 + i / 1000 for i in range(14)}
                    for f in spectral.FAMILIES}
    rmt = {"mode": "gate", "flag": "rmt_stable", "passed": True, "reason": "within",
           "measurements": {"families": rmt_families}, "findings": []}
    return with_guard_sections(cert, {"spectral": section, "rmt": rmt})


def test_wide_tables_never_overflow_the_page_at_1300px(tmp_path):
    """Spectral and RMT per-family tables wider than the page scroll in their own box: the
    page keeps its width and no column is cut off."""
    page = tmp_path / "wide.html"
    page.write_text(report.render(_wide_certificate(), "html"), encoding="utf-8")
    result = browser.check_page(page, screenshot=tmp_path / "wide.png", width=1300)
    assert result.problems() == []
    assert result.sticking_out == 0 and result.overflow_px == 0
    unwrapped = page.read_text().replace('<div class="scroll"><table', "<table")
    page.write_text(unwrapped, encoding="utf-8")  # the same page without the scroll boxes
    assert browser.check_page(page, width=1300).sticking_out > 0
