"""Text from a certificate is data wherever it is shown: hostile strings in every string field
of a real certificate change neither the structure of its Markdown nor any line that
`verify` and `report` print into a command a CI runner would execute.

A certificate's digest authenticates nothing (anyone can edit a field and reseal it), so the
attacker here edits fields freely. The Markdown is parsed (markdown-it, CommonMark with
tables) and compared token by token with the same certificate carrying a harmless string in
the same fields: hostile text may change the words, never the elements.
"""

from __future__ import annotations

import copy
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from invarlock import subjects, untrusted
from invarlock.certificate import document
from invarlock.certificate import markdown as md
from tests.faults.conftest import certify, invoke

MARKER = "<img src=x onerror=alert(1)></details>"
HOSTILE = (f"{MARKER}`tick`\n::add-mask::secret\r\n##[error]boom ::set-output name=v::PASS "
           "[link](https://evil.example) ![i](https://evil.example/i.png) | cell | @octocat #1 "
           "*em* _u_ <!-- c --> &amp;\n# heading\n- item")
BENIGN = "plain"
FREE_KEYS = ("validation", "verdict.explanations", "environment.libraries", "seeds",
             "edit.plan")  # maps whose keys are data, not field names
_PER_WINDOW = 8  # lists longer than this are per-window numbers and hashes


@pytest.fixture(scope="module")
def real_cert(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path_factory) -> dict:
    """A certificate from a real run of the built-in edit, with a format record and a reason
    added (the edit passes and is a float checkpoint), resealed."""
    out = tmp_path_factory.mktemp("real") / "run"
    code, summary, _ = certify(tiny_gpt2_dir, None, out, sonnets_path, fast_preset,
                               "--edit", "quant_rtn")
    assert code in (0, 1), summary
    cert = document.load_certificate(out)
    cert["subject"]["format"] = {
        "name": "hf-quantized", "method": "rtn", "bits": 8, "group_size": None,
        "backend": "kernels", "backend_version": "1.0", "forward": "dequantized"}
    cert["verdict"]["reasons"] = [*cert["verdict"]["reasons"], "a reason"]
    assert cert["guards"] and cert["edit"]
    return document.seal(cert)


def _paths(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every string leaf (('v', path)) and every key of a free-form map (('k', path))."""
    if isinstance(node, dict):
        free = ".".join(map(str, path)) in FREE_KEYS or (
            len(path) >= 2 and path[-1] == "families")
        for key, value in node.items():
            if free:
                yield ("k", (*path, key))
            yield from _paths(value, (*path, key))
    elif isinstance(node, list) and len(node) <= _PER_WINDOW:
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i))
    elif isinstance(node, str):
        yield ("v", path)


def _edited(cert: dict, paths: list[tuple], suffix: str) -> dict:
    """`cert` with `suffix` appended to every string and key that `paths` names (keys last,
    deepest first, so a path still leads where it did)."""
    out = copy.deepcopy(cert)
    for kind, path in sorted(paths, key=lambda p: (p[0] == "k", -len(p[1]))):
        parent = out
        for step in path[:-1]:
            parent = parent[step]
        if kind == "v":
            parent[path[-1]] += suffix
        else:
            parent[path[-1] + suffix] = parent.pop(path[-1])
    return out


def _structure(markdown: str) -> list[tuple]:
    """Every element of the parsed Markdown, without its words. An identifier is shown in a
    code span, other text as text: both are words here."""
    parser = MarkdownIt("commonmark").enable("table")
    out = []
    for token in parser.parse(markdown):
        out.append((token.type, token.tag, token.nesting))
        out += [(c.type, c.tag, c.nesting) for c in token.children or ()
                if c.type not in ("text", "text_special", "code_inline")]
    return out


def _words(markdown: str) -> str:
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    return " ".join(c.content for t in tokens for c in t.children or () if c.type == "text")


def _command_lines(text: str) -> list[str]:
    """Lines a GitHub Actions runner reads as workflow commands: `::` first (after spaces),
    or `##[` anywhere; the runner splits lines at \\n and \\r."""
    return [ln for ln in re.split(r"\r\n|\r|\n", text)
            if ln.strip().startswith("::") or "##[" in ln]


def _injected_lines(text: str) -> list[str]:
    """Lines that only a line break inside a field could have started."""
    return [ln for ln in re.split(r"\r\n|\r|\n", text)
            if ln.strip().startswith(("# heading", "- item", "::", "##[error]"))]


def test_every_string_field_is_walked(real_cert):
    paths = list(_paths(real_cert))
    where = {".".join(map(str, p)) for _, p in paths}
    for field in ("environment.device.name", "environment.python", "subject.source",
                  "subject.format.backend", "verdict.reasons.0", "edit.name", "dataset.spec"):
        assert field in where, field
    assert len(paths) > 100


def test_certificate_markdown_shows_hostile_text_as_text(real_cert):
    paths = list(_paths(real_cert))
    hostile = md.render(_edited(real_cert, paths, HOSTILE))
    benign = md.render(_edited(real_cert, paths, BENIGN))
    assert _structure(hostile) == _structure(benign)
    assert MARKER in _words(hostile)  # shown, character for character
    assert not _command_lines(hostile) and not _injected_lines(hostile)
    assert "<img" not in hostile and "</details>" not in hostile and "](https" not in hostile


@pytest.mark.parametrize("field", ["environment.device.name", "environment.python",
                                   "subject.source", "subject.format.backend",
                                   "dataset.spec", "guards", "validation"])
def test_each_field_alone_changes_no_element(real_cert, field):
    """One field at a time, so a field escaped only by accident of another is still caught."""
    paths = [(kind, p) for kind, p in _paths(real_cert)
             if ".".join(map(str, p)).startswith(field)]
    if field == "guards":  # the guard names themselves
        paths = [("k", ("guards", name)) for name in real_cert["guards"]]
    assert paths
    cert = real_cert
    if field == "guards":
        cert = copy.deepcopy(real_cert)
        cert["guards"] = {name + HOSTILE: g for name, g in cert["guards"].items()}
        benign = copy.deepcopy(real_cert)
        benign["guards"] = {name + BENIGN: g for name, g in benign["guards"].items()}
        assert _structure(md.render(cert)) == _structure(md.render(benign))
        assert not _command_lines(md.render(cert))
        return
    hostile = md.render(_edited(cert, paths, HOSTILE))
    assert _structure(hostile) == _structure(md.render(_edited(cert, paths, BENIGN)))
    assert MARKER in _words(hostile)


def _schema_valid_hostile(cert: dict) -> tuple[dict, list[tuple]]:
    """Every string field that can hold the hostile text and still match the schema."""
    out, taken = copy.deepcopy(cert), []
    for kind, path in _paths(cert):
        if kind != "v" or path[0] == "digest":
            continue
        trial = _edited(out, [(kind, path)], HOSTILE)
        if not document.schema_errors(trial):
            out, taken = trial, [*taken, (kind, path)]
    return document.seal(out), taken


@pytest.fixture(scope="module")
def hostile_folder(real_cert, tmp_path_factory) -> tuple[Path, list[tuple]]:
    cert, taken = _schema_valid_hostile(real_cert)
    folder = tmp_path_factory.mktemp("hostile")
    (folder / document.CERT_FILENAME).write_text(json.dumps(cert, ensure_ascii=False))
    return folder, taken


def test_the_hostile_certificate_reaches_the_fields_of_the_issue(hostile_folder):
    _, taken = hostile_folder
    where = {".".join(map(str, p)) for _, p in taken}
    for field in ("environment.device.name", "environment.python", "subject.source",
                  "subject.format.backend", "verdict.reasons.0", "dataset.spec"):
        assert field in where, field


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_verify_prints_no_workflow_command(hostile_folder, args):
    folder, _ = hostile_folder
    from click.testing import CliRunner

    from invarlock.cli import main

    result = CliRunner().invoke(main, ["verify", str(folder), *args])
    assert result.exit_code in (1, 2)
    assert "::add" in result.stdout.replace("\u200b", "").replace("\\u003a", ":")  # it is shown
    assert not _command_lines(result.stdout) and not _command_lines(result.stderr)
    assert not _injected_lines(result.stdout)


@pytest.mark.parametrize("fmt", ["md", "html", "json"])
def test_report_prints_no_workflow_command(hostile_folder, fmt):
    folder, _ = hostile_folder
    from click.testing import CliRunner

    from invarlock.cli import main

    result = CliRunner().invoke(main, ["report", str(folder), "--format", fmt])
    assert result.exit_code == 0, result.stderr
    assert not _command_lines(result.stdout) and not _command_lines(result.stderr)
    if fmt != "html":  # in HTML a line break inside text is only a space
        assert not _injected_lines(result.stdout)
    if fmt == "json":
        assert "##[error]boom" in json.loads(result.stdout)["subject"]  # the same value
    if fmt == "html":
        assert "<img" not in result.stdout
        assert html.escape(MARKER) in result.stdout  # shown as text, not doubly escaped


@pytest.mark.parametrize("text", [HOSTILE, "a_b *c* <d> &amp; `e` [f](g) @h #1 x::y ##[z",
                                  "models/int8", "final_n 8 < 200"])
def test_markdown_text_reads_back_as_its_characters(text):
    """What other media (the HTML report) take from the Markdown renderer is the text."""
    shown = md.as_text(md.summary_sentence({
        "primary_metric": {"gate_value": None, "catastrophic": False},
        "pairing": {"final_evaluated": True}, "policy": {"tier": text},
        "evidence": {"meets_profile": False, "profile": "dev", "shortfalls": [text]}}))
    assert untrusted.plain(text).replace("\u200b", "") in shown


def test_every_field_broken_prints_no_workflow_command(real_cert, tmp_path):
    """Schema-breaking hostile values too: verify lists them, report refuses in one line."""
    cert = _edited(real_cert, list(_paths(real_cert)), HOSTILE)
    (tmp_path / document.CERT_FILENAME).write_text(json.dumps(cert))
    for args in (["verify", str(tmp_path)], ["verify", str(tmp_path), "--json"],
                 ["report", str(tmp_path)]):
        code, _, stderr = invoke(*args)
        from click.testing import CliRunner

        from invarlock.cli import main

        result = CliRunner().invoke(main, args)
        assert result.exit_code == code == 2
        assert not _command_lines(result.stdout) and not _command_lines(stderr)
        assert not _injected_lines(result.stdout) and not _injected_lines(stderr)


def test_index_markdown_shows_hostile_text_as_text(real_cert):
    def doc(suffix: str) -> dict:
        return {"baseline": {"source": "models/base" + suffix},
                "subjects": [{"name": "a", "subject": "models/a" + suffix, "verdict": "PASS",
                              "certificate": "a/evaluation.cert.json", "ratio": 1.0,
                              "ratio_ci": [0.9, 1.1], "limit": 1.1, "error": None},
                             {"name": "b", "subject": "models/b" + suffix, "verdict": "ERROR",
                              "certificate": None, "ratio": None, "ratio_ci": None,
                              "limit": None, "error": "could not load" + suffix}]}

    hostile = subjects.index_markdown(doc(HOSTILE))
    assert _structure(hostile) == _structure(subjects.index_markdown(doc(BENIGN)))
    assert MARKER in _words(hostile) and not _command_lines(hostile)
