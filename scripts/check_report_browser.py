#!/usr/bin/env python3
"""Open an HTML report in headless Chromium and check it: it loads, makes no network request,
logs no console error, and draws its charts. Optionally save a full-page screenshot.

    python scripts/check_report_browser.py REPORT.html [--screenshot shot.png]
    python scripts/check_report_browser.py --certificate evaluation.cert.json --screenshot s.png
    python scripts/check_report_browser.py --synthetic fail --screenshot s.png

Chromium is driven through the DevTools protocol over a pipe (--remote-debugging-pipe), so
nothing listens on a port and no extra package is needed. Exit 0 when every check holds.
`tests/test_report_browser.py` runs the same checks when a Chromium binary is installed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars")
WIDTH = 1000


def find_browser() -> str | None:
    explicit = os.environ.get("INVARLOCK_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageCheck:
    """What the browser saw while loading one page."""

    url: str
    loaded: bool = False
    title: str = ""
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    svg_count: int = 0
    drawn_charts: int = 0  # svg elements laid out with a visible area and drawn shapes
    tables: list[int] = field(default_factory=list)  # body rows of each visible table
    text: str = ""
    overflow_px: int = 0  # how far content sticks out beyond the viewport width
    sticking_out: int = 0  # tables wider than the page with no box to scroll them in
    width: int = WIDTH
    screenshot: Path | None = None

    @property
    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]

    def problems(self) -> list[str]:
        out = []
        if not self.loaded:
            out.append("page did not finish loading")
        out += [f"console: {e}" for e in self.console_errors]
        out += [f"network request: {u}" for u in self.foreign_requests]
        if self.overflow_px > 0:
            out.append(f"content overflows the {self.width}px viewport by {self.overflow_px}px")
        if self.sticking_out:
            out.append(f"{self.sticking_out} table(s) stick out of the page at {self.width}px "
                       "with no box to scroll them in (columns hidden)")
        return out


class _Pipe:
    """DevTools protocol messages (JSON, NUL-terminated) over the two inherited pipes."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        wanted = self.next_id
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for reply in self._read():
                if reply.get("id") == wanted:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)
        raise TimeoutError(f"no reply to {method}")

    def wait_for(self, method: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == method for e in self.events):
                return True
            self.events.extend(self._read())
        return False

    def _read(self) -> list[dict[str, Any]]:
        chunk = os.read(self.read_fd, 1 << 20)
        if not chunk:
            raise ConnectionError("the browser closed the DevTools pipe")
        self.buffer += chunk
        *messages, self.buffer = self.buffer.split(b"\0")
        return [json.loads(m) for m in messages if m]


def check_page(path: Path, *, screenshot: Path | None = None, browser: str | None = None,
               settle_s: float = 0.5, clip: tuple[int, int] | None = None,
               width: int = WIDTH) -> PageCheck:
    """Load `path` in a fresh headless browser profile, `width` CSS pixels wide, and record
    what happened."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium binary found (apt-get install chromium)")
    url = Path(path).resolve().as_uri()
    result = PageCheck(url=url, width=width)
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def wire_pipes() -> None:  # the protocol's fixed descriptors: 3 in, 4 out (inheritable)
        low_in, low_out = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(low_in, 3)
        os.dup2(low_out, 4)

    with tempfile.TemporaryDirectory(prefix="invarlock-chromium-") as profile:
        proc = subprocess.Popen(
            [browser, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             f"--window-size={width},800", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        pipe = _Pipe(to_browser_w, from_browser_r)
        try:
            _drive(pipe, result, screenshot, settle_s, clip)
        finally:
            with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError, OSError):
                pipe.send("Browser.close", timeout=5)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_browser_w)
            os.close(from_browser_r)
    return result


def _drive(pipe: _Pipe, result: PageCheck, screenshot: Path | None, settle_s: float,
           clip: tuple[int, int] | None) -> None:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.send("Emulation.setDeviceMetricsOverride",
              {"width": result.width, "height": 800, "deviceScaleFactor": 1,
               "mobile": False},
              session=session)
    pipe.events.clear()
    pipe.send("Page.navigate", {"url": result.url}, session=session)
    result.loaded = pipe.wait_for("Page.loadEventFired")
    end = time.monotonic() + settle_s
    while time.monotonic() < end:  # late console messages or requests
        pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)
        time.sleep(0.05)
    page = json.loads(pipe.send("Runtime.evaluate", {"expression": _PROBE, "returnByValue": True},
                                session=session)["result"]["value"])
    result.title, result.svg_count, result.text = page["title"], page["svgs"], page["text"]
    result.drawn_charts, result.tables = page["drawn"], page["tables"]
    result.overflow_px = max(0, int(page["overflow"]))
    result.sticking_out = int(page["sticking"])
    for event in pipe.events:
        _record(event, result)
    if screenshot is not None:
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": result.width, "height": int(page["height"]), "deviceScaleFactor": 1,
                   "mobile": False}, session=session)
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:  # (top, height) in CSS pixels
            params["clip"] = {"x": 0, "y": clip[0], "width": result.width, "height": clip[1],
                              "scale": 1}
        shot = pipe.send("Page.captureScreenshot", params, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        result.screenshot = screenshot


# What the page looks like once laid out: a chart counts as drawn when its box has an area and
# it holds shapes; a table counts when it is visible, with the number of its data rows.
_PROBE = """JSON.stringify({
  title: document.title,
  svgs: document.querySelectorAll('svg').length,
  drawn: [...document.querySelectorAll('svg')].filter(s => {
    const r = s.getBoundingClientRect();
    return r.width > 0 && r.height > 0 &&
      s.querySelectorAll('path, rect, circle, line, polyline, polygon').length > 0;
  }).length,
  tables: [...document.querySelectorAll('table')]
    .filter(t => t.getBoundingClientRect().height > 0)
    .map(t => [...t.querySelectorAll('tr')].filter(r => r.querySelector('td')).length),
  text: document.body.innerText,
  overflow: document.documentElement.scrollWidth - window.innerWidth,
  sticking: [...document.querySelectorAll('table')].filter(t => {
    const page = (document.querySelector('main') || document.body).getBoundingClientRect();
    for (let el = t.parentElement; el && el !== document.body; el = el.parentElement) {
      if (['auto', 'scroll'].includes(getComputedStyle(el).overflowX)) return false;
    }
    return t.getBoundingClientRect().right > page.right + 0.5;
  }).length,
  height: document.documentElement.scrollHeight})"""


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decompressed (still filtered) scanlines of a PNG: a page of one
    flat colour filters to a handful of distinct byte values, a painted one to hundreds."""
    import struct
    import zlib

    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def _record(event: dict[str, Any], result: PageCheck) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        result.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                              for a in params.get("args", [])))
    elif method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        result.console_errors.append(details.get("text", "exception"))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        result.console_errors.append(f"{entry.get('source')}: {entry.get('text')}")
    elif method == "Network.requestWillBeSent":
        result.requests.append(params.get("request", {}).get("url", ""))


def _synthetic_report(kind: str, out: Path) -> Path:
    """Render one of the synthetic certificates (tests/certs.py) to `out`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from invarlock import report
    from tests.certs import synthetic_certificate
    from tests.guard_sections import with_guard_sections

    shifts = {"pass": 0.0, "fail": 0.2, "catastrophic": 1.5}
    if kind == "accuracy":
        from invarlock.enums import MetricKind

        cert = synthetic_certificate(kind=MetricKind.ACCURACY, n=64)
    else:
        cert = synthetic_certificate(shift=shifts[kind])
    if kind == "fail":
        cert = with_guard_sections(cert)
    out.write_text(report.render(cert, "html"), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("html", nargs="?", type=Path, help="an HTML report to open")
    source.add_argument("--certificate", type=Path, help="render this certificate first")
    source.add_argument("--synthetic", choices=("pass", "fail", "catastrophic", "accuracy"),
                        help="render a synthetic certificate first")
    parser.add_argument("--screenshot", type=Path, help="write a full-page PNG here")
    parser.add_argument("--width", type=int, default=WIDTH, help="viewport width in CSS px")
    parser.add_argument("--clip", type=int, nargs=2, metavar=("TOP", "HEIGHT"),
                        help="screenshot only this band of the page (CSS pixels)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        page = args.html
        if args.certificate is not None:
            from invarlock import report
            from invarlock.certificate.document import load_certificate

            page = Path(tmp) / "report.html"
            page.write_text(report.render(load_certificate(args.certificate), "html"), "utf-8")
        elif args.synthetic is not None:
            page = _synthetic_report(args.synthetic, Path(tmp) / "report.html")
        result = check_page(page, screenshot=args.screenshot,
                            clip=tuple(args.clip) if args.clip else None, width=args.width)
    print(json.dumps({"url": result.url, "title": result.title, "svgs": result.svg_count,
                      "drawn_charts": result.drawn_charts, "tables": result.tables,
                      "requests": result.requests, "problems": result.problems(),
                      "screenshot": str(result.screenshot) if result.screenshot else None},
                     indent=2))
    return 0 if not result.problems() else 1


if __name__ == "__main__":
    sys.exit(main())
