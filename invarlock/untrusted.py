"""Text from a certificate or an artifact, made inert for the medium it goes to.

A certificate's digest proves integrity against accidents, not authorship: anyone can edit a
field and recompute it. So every string read from a certificate, an index or an artifact
(a device name, a subject's source, a reason, a backend) is untrusted, and reaches a reader
only through one of these functions, one per medium:

- `markdown`: inline Markdown text (PR comment, check run, job summary) that renders as the
  literal characters and nothing else — no HTML, no links, no images, no mentions, no table
  cells, no code spans, one line;
- `html`: text inside an HTML element or a quoted attribute;
- `log_line`: text printed to a terminal or a CI log — no control characters, one line, and no
  way to start a workflow command (`::name::`, `##[name]`) wherever it lands in the line;
- `command_data` / `command_property`: a workflow command's message and its properties, as
  the Actions runner unescapes them.

Pure functions of a string; `limit` cuts long text with an ellipsis so one field cannot
crowd out a report.
"""

from __future__ import annotations

import html as _html
import re
import unicodedata

ELLIPSIS = "…"
DEFAULT_LIMIT = 300

# Everything that is not printable on one line: C0/C1 controls, DEL, line and paragraph
# separators, and the bidirectional overrides that can make text read differently than it is.
_INVISIBLE = re.compile(
    "[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f]")
_SPACES = re.compile(r"\s+")
# ASCII punctuation that Markdown (CommonMark + GitHub extensions) may give a meaning to; a
# backslash before any of them makes it a literal character (CommonMark 2.4).
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>:\"'$=^/])")
_ZWSP = "\u200b"


def plain(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """One printable line: control characters and line breaks become spaces, runs of
    whitespace one space, and text longer than `limit` is cut with an ellipsis."""
    s = unicodedata.normalize("NFC", text if isinstance(text, str) else str(text))
    s = _INVISIBLE.sub(" ", s)
    s = _SPACES.sub(" ", s).strip()
    if limit is not None and len(s) > limit:
        s = s[: max(limit - 1, 0)].rstrip() + ELLIPSIS
    return s


def markdown(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """Inline Markdown that renders as exactly the given characters.

    HTML is written as entities (no tags, no comments), every punctuation mark Markdown could
    read is backslash-escaped (no emphasis, links, images, code spans, table cells, headings
    or block quotes), and `@`, `#`, `://` and `www.` carry a zero-width space so that GitHub
    links no user, team, issue or URL."""
    s = plain(text, limit)
    s = _html.escape(s, quote=False)  # & < > as entities, which the next step leaves alone
    s = _MD_PUNCT.sub(r"\\\1", s)
    s = s.replace("\\:\\/\\/", "\\:\\/" + _ZWSP + "\\/")  # no bare-URL autolink
    s = re.sub(r"(?i)www\\\.", "www" + _ZWSP + "\\.", s)
    return s.replace("@", "@" + _ZWSP).replace("\\#", "\\#" + _ZWSP)


def html(text: object, limit: int | None = None) -> str:
    """Text for an HTML element or a quoted attribute value."""
    return _html.escape(plain(text, limit), quote=True)


def log_line(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """Text for a terminal or CI log: one printable line that no runner reads as a command.

    The Actions runner takes a line that starts with `::` (after leading spaces) or `##[` as
    a workflow command; a zero-width space between the two characters keeps the text
    readable and inert wherever it ends up in the printed line."""
    s = plain(text, limit)
    s = s.replace("::", ":" + _ZWSP + ":")
    return s.replace("##[", "#" + _ZWSP + "#[")


def command_data(text: object) -> str:
    """A workflow command's message, as the runner unescapes it (`%`, CR, LF)."""
    s = text if isinstance(text, str) else str(text)
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def command_property(text: object) -> str:
    """A workflow command's property value (`title=...`): data escaping plus `:` and `,`."""
    return command_data(text).replace(":", "%3A").replace(",", "%2C")
