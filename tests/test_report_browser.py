"""The HTML report in a real headless browser: it loads from one file, asks the network for
nothing, logs no console error, fits the page width and draws its charts.

Skipped when no Chromium binary is installed (Debian: `apt-get install chromium`; or point
INVARLOCK_CHROMIUM at one). `scripts/check_report_browser.py` runs the same checks by hand
and saves a screenshot.
"""

from __future__ import annotations

import importlib.util
import struct
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

pytestmark = pytest.mark.skipif(browser.find_browser() is None,
                                reason="no Chromium binary (apt-get install chromium)")

CASES = {
    "fail-with-guards": (lambda: with_guard_sections(synthetic_certificate(shift=0.2, seed=2)),
                         "FAIL", 3),
    "catastrophic": (lambda: synthetic_certificate(shift=1.5, seed=3), "FAIL", 1),
    "accuracy": (lambda: synthetic_certificate(kind=MetricKind.ACCURACY, n=64, seed=4),
                 "PASS", 1),
}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("case", list(CASES))
def test_report_renders_cleanly_in_chromium(case, tmp_path):
    build, verdict, charts = CASES[case]
    page = tmp_path / "report.html"
    page.write_text(report.render(build(), "html"), encoding="utf-8")
    shot = tmp_path / "shot.png" if case == "fail-with-guards" else None
    result = browser.check_page(page, screenshot=shot)
    assert result.problems() == []
    assert result.requests == [page.resolve().as_uri()]
    assert result.title == f"InvarLock certificate: {verdict}"
    assert result.text.lstrip().startswith(("✔ " if verdict == "PASS" else "✘ ") + verdict)
    assert result.svg_count == charts
    if shot is not None:
        width, height = png_size(shot)
        assert width == browser.WIDTH and height > 2000  # the whole page, not the viewport


def test_the_checker_sees_network_requests_and_console_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title>'
                    '<link rel="stylesheet" href="http://127.0.0.1:9/style.css"></head>'
                    "<body><script>console.error('boom')</script></body></html>")
    result = browser.check_page(page)
    problems = result.problems()
    assert any("127.0.0.1:9/style.css" in p for p in problems)
    assert any("boom" in p for p in problems)
