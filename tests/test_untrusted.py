"""Untrusted text is inert in every medium it reaches, and still reads as what it was."""

from __future__ import annotations

import re

import pytest

from invarlock import untrusted

HOSTILE = [
    '<img src=x onerror=alert(1)>',
    "</details><details open><summary>✅ PASS</summary>",
    "line one\nline two\r\n::set-output name=verdict::PASS",
    "`code` **bold** _it_ [link](https://evil.example) ![img](https://evil.example/x.png)",
    "| cell | cell |",
    "# heading",
    "> quote",
    "@octocat and @org/team see #12",
    "<!-- hidden --> &amp; &lt;",
    "::add-mask::secret",
    "##[error]forged",
    "\u202eevil\u202c",
    "https://evil.example/path and www.evil.example",
]


def _zwsp_free(s: str) -> str:
    return s.replace("\u200b", "")


@pytest.mark.parametrize("text", HOSTILE)
def test_markdown_has_no_active_syntax(text):
    out = untrusted.markdown(text)
    assert "\n" not in out and "\r" not in out
    assert "<" not in out and ">" not in out  # every angle bracket is an entity
    # every Markdown punctuation mark left in the output is escaped by a backslash
    for match in re.finditer(r"[`*_\[\]()|#!~]", out):
        assert out[match.start() - 1] == "\\", (text, out)
    assert not re.search(r"@\w", out)  # no mention
    assert "://" not in out and "www\\." not in out.lower()  # no autolink


def test_markdown_keeps_the_characters_readable():
    out = untrusted.markdown("A100-SXM4 (80GB) v1.2_3")
    assert re.sub(r"\\(.)", r"\1", out) == "A100-SXM4 (80GB) v1.2_3"


@pytest.mark.parametrize("text", HOSTILE)
def test_html_has_no_markup(text):
    out = untrusted.html(text)
    assert "<" not in out and ">" not in out and '"' not in out and "\n" not in out


@pytest.mark.parametrize("text", HOSTILE)
def test_log_line_never_starts_a_workflow_command(text):
    out = untrusted.log_line(text)
    assert "\n" not in out and "\r" not in out
    assert "::" not in out and "##[" not in out
    assert "\u202e" not in out
    assert _zwsp_free(out).replace(" ", "") == _zwsp_free(
        untrusted.plain(text)).replace(" ", "")


def test_plain_cuts_long_text_with_an_ellipsis():
    out = untrusted.plain("x" * 1000, limit=20)
    assert len(out) == 20 and out.endswith(untrusted.ELLIPSIS)
    assert untrusted.plain("short", limit=20) == "short"


def test_command_escaping_round_trips_as_the_runner_unescapes():
    text = "50% done\r\nnext: a, b"

    def runner_unescape(s: str) -> str:
        return (s.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":")
                .replace("%2C", ",").replace("%25", "%"))

    assert "\n" not in untrusted.command_property(text)
    assert runner_unescape(untrusted.command_data(text)) == text
    assert runner_unescape(untrusted.command_property(text)) == text
