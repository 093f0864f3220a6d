"""Running the certifier: flags, environment, and every way it can end."""

from __future__ import annotations

import io
import json
import shlex
import sys
from pathlib import Path

from invarlock.enums import Verdict
from invarlock.github.certifier import (
    certify_arguments,
    child_environment,
    interpret,
    run_certifier,
)
from invarlock.github.outcome import Conclusion
from invarlock.github.settings import CertifyInputs
from tests.github.conftest import FAKE_CERTIFIER, write_report


def test_arguments_use_flag_equals_value():
    inputs = CertifyInputs(baseline="-odd dir", subject="m/int8", dataset="d.txt",
                           profile="dev", tier="balanced", presets=("a.yaml", "b.yaml"),
                           device="cuda:1")
    assert certify_arguments(inputs, Path("out")) == [
        "--baseline=-odd dir", "--subject=m/int8", "--dataset=d.txt", "--profile=dev",
        "--tier=balanced", "--device=cuda:1", "--preset=a.yaml", "--preset=b.yaml",
        "--out=out", "--json"]
    assert certify_arguments(CertifyInputs(profile="", tier=""), Path("o")) == ["--out=o",
                                                                                 "--json"]


def test_the_child_gets_no_token_and_no_inputs():
    env = child_environment({"PATH": "/bin", "INPUT_GITHUB_TOKEN": "tok", "GITHUB_TOKEN": "tok",
                             "INPUT_BASELINE": "m", "OTHER": "has tok inside",
                             "ACTIONS_RUNTIME_TOKEN": "r", "HF_HOME": "/h"}, "tok")
    assert env == {"PATH": "/bin", "HF_HOME": "/h"}


def _result(cert_path: Path, verdict: str) -> str:
    return json.dumps({"verdict": verdict, "certificate": str(cert_path)})


def test_pass_and_fail_read_the_certificate(tmp_path, certificates):
    path = write_report(tmp_path / "p", certificates["pass"])
    outcome = interpret(0, "progress noise\n" + _result(path, "PASS"), [])
    assert outcome.verdict is Verdict.PASS and outcome.conclusion() is Conclusion.SUCCESS
    assert outcome.certificate_path == path.resolve()
    assert outcome.markdown_path == (tmp_path / "p" / "evaluation.cert.md").resolve()
    path = write_report(tmp_path / "f", certificates["fail"])
    outcome = interpret(1, _result(path, "FAIL"), [])
    assert outcome.exit_code == 1 and outcome.conclusion() is Conclusion.FAILURE


def test_inconsistent_or_missing_results_are_evidence_errors(tmp_path, certificates):
    path = write_report(tmp_path / "p", certificates["pass"])
    cases = {
        (1, _result(path, "FAIL")): "certificate says PASS",
        (1, _result(path, "PASS")): "printed PASS but exited with 1",
        (0, ""): "printed no verdict",
        (0, json.dumps({"verdict": "PASS"})): "no certificate path",
        (0, _result(tmp_path / "missing.json", "PASS")): "certificate not found",
    }
    for (code, stdout), message in cases.items():
        outcome = interpret(code, stdout, [])
        assert outcome.exit_code == 3 and outcome.conclusion() is Conclusion.FAILURE
        assert message in outcome.error, (message, outcome.error)


def test_a_tampered_certificate_is_refused(tmp_path, certificates):
    path = write_report(tmp_path / "p", certificates["pass"])
    data = json.loads(path.read_text())
    data["primary_metric"]["ratio"] = 0.5
    path.write_text(json.dumps(data))
    outcome = interpret(0, _result(path, "PASS"), [])
    assert outcome.exit_code == 3 and "content digest mismatch" in outcome.error


def test_errors_keep_their_exit_code_and_message():
    outcome = interpret(2, json.dumps({"verdict": None, "error": "bad flag", "exit_code": 2}),
                        [])
    assert (outcome.exit_code, outcome.error) == (2, "bad flag")
    usage = interpret(2, "", ["Usage: invarlock certify", "Error: Invalid value for '--tier'"])
    assert usage.exit_code == 2 and "Invalid value for '--tier'" in usage.error
    killed = interpret(-9, "", ["CUDA out of memory"])
    assert killed.exit_code == 3
    assert killed.error == "the certifier was killed by signal 9:\nCUDA out of memory"
    assert interpret(127, "", []).error == "the certifier exited with status 127"


def _fake(scenario: str) -> list[str]:
    return [sys.executable, str(FAKE_CERTIFIER), "--scenario", scenario]


def test_running_a_real_process_echoes_its_log(tmp_path):
    log = io.StringIO()
    outcome = run_certifier(_fake("fail"), ["--out=" + str(tmp_path / "r"), "--json"],
                            env={"PATH": "/usr/bin:/bin"}, log_stream=log)
    assert outcome.verdict is Verdict.FAIL
    assert "fake certifier: loading models" in log.getvalue()


def test_a_killed_certifier_is_reported_with_its_last_words(tmp_path):
    outcome = run_certifier(_fake("crash"), ["--out=" + str(tmp_path)], env={},
                            log_stream=io.StringIO())
    assert outcome.exit_code == 3
    assert outcome.error.startswith("the certifier was killed by signal 9")
    assert "CUDA out of memory" in outcome.error


def test_a_missing_command_is_bad_input(tmp_path):
    outcome = run_certifier(["/nonexistent/invarlock", "certify"], [], env={},
                            log_stream=io.StringIO())
    assert outcome.exit_code == 2
    assert "INVARLOCK_CERTIFY_COMMAND" in outcome.error
    assert shlex.split(shlex.join(_fake("x")))  # the fake is addressable as a command line
