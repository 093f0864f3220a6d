"""Step outputs (GITHUB_OUTPUT) and workflow commands on stdout."""

from __future__ import annotations

import io

import pytest

from invarlock.github.commands import WorkflowCommands, escape_data, escape_property
from invarlock.github.outcome import Outcome
from invarlock.github.outputs import format_outputs, write_outputs
from tests.github.conftest import parse_outputs


def test_outputs_survive_newlines_and_lookalike_lines(tmp_path):
    path = tmp_path / "out"
    path.write_text("earlier=kept\n")
    values = {"verdict": "PASS", "error": "line one\nverdict=FAIL\nline three",
              "ratio": "1.0012", "empty": ""}
    write_outputs(path, values)
    parsed = parse_outputs(path.read_text())
    assert parsed == {"earlier": "kept", **values}


def test_every_output_gets_its_own_random_delimiter():
    text = format_outputs({"a": "1", "b": "2"})
    delimiters = [line.split("<<")[1] for line in text.splitlines() if "<<" in line]
    assert len(set(delimiters)) == 2 and all(d.startswith("ghadelimiter_") for d in delimiters)
    with pytest.raises(ValueError):
        format_outputs({"bad name": "x"})


def test_outcome_outputs(certificates):
    failed = Outcome.failed(3, "no evidence").outputs()
    assert failed["verdict"] == "" and failed["exit-code"] == "3"
    assert failed["ratio"] == "" and failed["error"] == "no evidence"
    from invarlock.enums import Verdict

    cert = certificates["accuracy"]
    out = Outcome(0, Verdict.PASS, cert, None, None).outputs()
    assert out["ratio-ci-upper"] == "" and out["delta-ci-lower"] == repr(
        float(cert["primary_metric"]["delta"]["ci"][0]))
    assert out["limit"] == "-1.0"


def test_commands_escape_their_payload():
    assert escape_data("50%\r\nnext") == "50%25%0D%0Anext"
    assert escape_property("a:b,c") == "a%3Ab%2Cc"
    stream = io.StringIO()
    commands = WorkflowCommands(stream)
    commands.warning("two\nlines ::error::not a command", title="T: x")
    commands.add_mask("s3cret")
    with commands.group("log"), commands.stop_commands():
        pass
    lines = stream.getvalue().splitlines()
    assert lines[0] == "::warning title=T%3A x::two%0Alines ::error::not a command"
    assert lines[1] == "::add-mask::s3cret"
    assert lines[2] == "::group::log"
    token = lines[3].removeprefix("::stop-commands::")
    assert len(token) == 32 and lines[4] == f"::{token}::" and lines[5] == "::endgroup::"


def test_outside_actions_commands_are_plain_lines_and_nothing_is_masked():
    stream = io.StringIO()
    commands = WorkflowCommands(stream, in_actions=False)
    commands.add_mask("s3cret")
    commands.error("broken", title="InvarLock")
    with commands.group("g"), commands.stop_commands():
        pass
    assert stream.getvalue() == "error: InvarLock: broken\n"
