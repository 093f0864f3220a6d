"""What every command shares: logging, exit codes, and the one place errors become them.

A command's body returns its exit code and, for `--json`, the object to print; `run_guarded`
turns an `InvarlockError` into one line on stderr and its exit code, anything else into one
"internal error" line, so no command prints a traceback or a second JSON object.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from invarlock.errors import InvarlockError, MissingExtraError

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_EVIDENCE = 0, 1, 2, 3

log = logging.getLogger("invarlock")


def configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("invarlock: %(levelname)s: %(message)s"))
    root = logging.getLogger("invarlock")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    # transformers imports an installed torchao while loading any checkpoint, and torchao
    # announces each optional kernel it cannot load here (other GPU generations): not news
    # for a certification, and a kernel a checkpoint really needs fails its load anyway.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def require_hf(feature: str) -> None:
    """Model commands need torch and transformers; say which extra installs them."""
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(feature, "hf")


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Keep stdout for the one JSON object: anything a library prints goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run_guarded(as_json: bool, body: Callable[[], tuple[int, dict[str, Any] | None]]) -> None:
    """Run a command body; translate errors into one line and the right exit code.

    The body returns its exit code and, for `--json`, the object to print once stdout is
    stdout again.
    """
    try:
        with _stdout_to_stderr(as_json):
            code, payload = body()
    except InvarlockError as exc:
        fail(as_json, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail(as_json, "interrupted", 130)
    except Exception as exc:  # a defect, not bad input: still one line, unless debugging
        if os.environ.get("INVARLOCK_DEBUG"):
            raise
        fail(as_json, f"internal error: {type(exc).__name__}: {exc} "
                       "(set INVARLOCK_DEBUG=1 for the traceback)", EXIT_EVIDENCE)
    if as_json and payload is not None:
        click.echo(strict_json(payload))
    sys.exit(code)


def strict_json(payload: Any) -> str:
    """JSON that every parser accepts: NaN and infinities (not JSON) become null."""
    from invarlock.certificate.document import strict_json as dumps

    return dumps(payload)


def fail(as_json: bool, message: str, code: int) -> None:
    from invarlock.untrusted import log_line  # a message may quote a certificate or a path

    click.echo(f"invarlock: error: {log_line(message, limit=None)}", err=True)
    if as_json:
        click.echo(error_json(message, code))
    sys.exit(code)


def error_json(message: str, code: int) -> str:
    """The one JSON object `--json` prints when there is no verdict to report."""
    return strict_json({"verdict": "ERROR", "exit_code": code, "error": message})


class CommandGroup(click.Group):
    """With `--json` anywhere on the command line, a usage error (unknown flag, bad value,
    missing argument) is reported like any other error: one line on stderr and exactly one
    JSON object on stdout, instead of click's usage block."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            fail(True, exc.format_message(), exc.exit_code)
        except click.Abort:
            fail(True, "aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)
