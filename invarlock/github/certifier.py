"""Run the certifier as a child process: `invarlock certify ... --json`.

A separate process because the certifier's contract is its command line (one JSON object on
stdout, the exit code 0/1/2/3) and because the Action must report whatever happens to it:
an out-of-memory kill or a CUDA crash ends the child, not the reporter, which then still
completes the check run (failure) and updates the comment. It also keeps the job token out
of the process that loads models: the child's environment has no token and no inputs.

`INVARLOCK_CERTIFY_COMMAND` replaces `invarlock certify` (for example `python -m invarlock
certify` for another interpreter); the flags below are appended to it.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from invarlock.enums import Verdict
from invarlock.errors import InvarlockError
from invarlock.github.artifact import outcome_from_certificate
from invarlock.github.outcome import EXIT_EVIDENCE, EXIT_FAIL, EXIT_INPUT, EXIT_PASS, Outcome
from invarlock.github.settings import CERTIFY_COMMAND_VARIABLE, CertifyInputs

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20
_SECRET_VARIABLES = ("GITHUB_TOKEN", "ACTIONS_RUNTIME_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
                     "ACTIONS_ID_TOKEN_REQUEST_URL")


def certify_arguments(inputs: CertifyInputs, out_dir: Path) -> list[str]:
    """The `invarlock certify` flags for the inputs (`--flag=value`, so no value reads as a
    flag)."""
    args = []
    for flag, value in (("--baseline", inputs.baseline), ("--subject", inputs.subject),
                        ("--edit-config", inputs.edit_config), ("--dataset", inputs.dataset),
                        ("--profile", inputs.profile), ("--tier", inputs.tier),
                        ("--device", inputs.device), ("--dtype", inputs.dtype)):
        if value:
            args.append(f"{flag}={value}")
    args += [f"--preset={preset}" for preset in inputs.presets]
    args += [f"--out={out_dir}", "--json"]
    return args


def child_environment(environ: Mapping[str, str], token: str) -> dict[str, str]:
    """The environment without the Action's inputs and without any token."""
    return {k: v for k, v in environ.items()
            if not k.startswith("INPUT_") and k not in _SECRET_VARIABLES
            and not (token and token in v)}


def run_certifier(command: Sequence[str], arguments: Sequence[str], *,
                  env: Mapping[str, str], log_stream: TextIO | None = None,
                  on_start: Callable[[subprocess.Popen[str]], None] | None = None) -> Outcome:
    """Run the certifier, echo its log, and turn what it left behind into an Outcome.

    `on_start` receives the child process (the cancellation handler stops it on a signal).
    """
    log_stream = log_stream if log_stream is not None else sys.stderr
    argv = [*command, *arguments]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=dict(env), text=True,
                                encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return Outcome.failed(EXIT_INPUT, f"certify command not found: {command[0]!r} (install "
                                          f"invarlock or set {CERTIFY_COMMAND_VARIABLE})")
    except OSError as exc:
        return Outcome.failed(EXIT_INPUT, f"cannot start {command[0]!r}: {exc}")
    if on_start is not None:
        on_start(proc)
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    echo = threading.Thread(target=_echo, args=(proc.stderr, log_stream, tail), daemon=True)
    echo.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    code = proc.wait()
    echo.join()
    return interpret(code, stdout, list(tail))


def interpret(code: int, stdout: str, stderr_tail: Sequence[str]) -> Outcome:
    """From the exit code, the printed JSON and the last log lines to an Outcome."""
    result = _parse_result(stdout)
    if code in (EXIT_PASS, EXIT_FAIL):
        return _verdict_outcome(code, result)
    if code in (EXIT_INPUT, EXIT_EVIDENCE):
        error = result.get("error") if result else None
        return Outcome.failed(code, str(error) if error else _tail_message(stderr_tail))
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return Outcome.failed(EXIT_EVIDENCE, f"the certifier {how}" + _tail_suffix(stderr_tail))


def _verdict_outcome(code: int, result: dict[str, Any] | None) -> Outcome:
    if result is None or result.get("verdict") not in ("PASS", "FAIL"):
        return Outcome.failed(EXIT_EVIDENCE, f"the certifier exited with {code} but printed no "
                                             "verdict")
    verdict = Verdict(result["verdict"])
    if (verdict is Verdict.PASS) != (code == EXIT_PASS):
        return Outcome.failed(EXIT_EVIDENCE, f"the certifier printed {verdict} but exited with "
                                             f"{code}")
    if not result.get("certificate"):
        return Outcome.failed(EXIT_EVIDENCE, "the certifier printed no certificate path")
    try:
        outcome = outcome_from_certificate(Path(result["certificate"]))
    except InvarlockError as exc:
        return Outcome.failed(EXIT_EVIDENCE, f"the certificate cannot be used: {exc}")
    if outcome.verdict is not verdict:
        return Outcome.failed(EXIT_EVIDENCE, f"the certifier printed {verdict} but the "
                                             f"certificate says {outcome.verdict}")
    return outcome


def _parse_result(stdout: str) -> dict[str, Any] | None:
    """The one JSON object on stdout (tolerating stray lines before it)."""
    text = stdout.strip()
    candidates = [text, *reversed(text.splitlines())] if text else []
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _echo(stream: TextIO | None, sink: TextIO, tail: deque[str]) -> None:
    if stream is None:
        return
    for line in stream:
        sink.write(line)
        sink.flush()
        if line.strip():
            tail.append(line.rstrip("\n"))


def _tail_message(tail: Sequence[str]) -> str:
    return "\n".join(tail[-5:]) if tail else "the certifier failed without a message"


def _tail_suffix(tail: Sequence[str]) -> str:
    return (":\n" + "\n".join(tail[-5:])) if tail else ""


class Cancellation:
    """SIGTERM/SIGINT while the certifier runs: stop the child, remember the signal.

    `docker stop` (the Action's cancel and timeout handling) and the runner's own cancel send
    SIGTERM or SIGINT; the entrypoint then still completes the check run as `cancelled`
    within the stop grace period instead of leaving it in progress.

    A cancel can also come before there is a container to stop: `docker stop` then finds
    nothing and the container starts anyway. action.yml's trap therefore creates `marker`
    before it calls `docker stop`, and `requested()`, asked after the handlers are installed,
    sees it. Either the marker was there when asked, or the stop came later and reached the
    running entrypoint's handler: no order of the two leaves the certifier running.
    """

    def __init__(self, marker: Path | None = None) -> None:
        self.signal_number: int | None = None
        self._child: subprocess.Popen[str] | None = None
        self._marker = marker

    def requested(self) -> bool:
        """Whether the job was cancelled, by a signal or by the trap's marker file."""
        if self.signal_number is None and self._marker is not None and self._marker.exists():
            log.warning("the job was cancelled before the certifier started")
            self.signal_number = int(signal.SIGTERM)
        return self.signal_number is not None

    def watch(self, child: subprocess.Popen[str]) -> None:
        self._child = child
        if self.signal_number is not None:
            self._stop_child()

    def handle(self, signal_number: int, frame: object = None) -> None:
        log.warning("received signal %d: stopping the certifier", signal_number)
        self.signal_number = signal_number
        self._stop_child()

    def _stop_child(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.terminate()

    @contextmanager
    def installed(self) -> Iterator[Cancellation]:
        """Handle SIGTERM and SIGINT in between (only possible in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
