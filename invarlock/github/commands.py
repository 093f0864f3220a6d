"""Workflow commands: the lines on stdout the Actions runner reads (`::warning::`, ...).

Only these go to stdout; everything else is logging on stderr. Messages are escaped the way
the runner expects, so text from a certificate cannot start a command of its own.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from invarlock.untrusted import command_data as escape_data
from invarlock.untrusted import command_property as escape_property


class WorkflowCommands:
    """Writes workflow commands to `stream`; outside Actions they are plain readable lines."""

    def __init__(self, stream: TextIO | None = None, *, in_actions: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._in_actions = in_actions

    def add_mask(self, value: str) -> None:
        """Ask the runner to hide `value` in all later log lines (only inside Actions)."""
        if value and self._in_actions:
            self._command("add-mask", value)

    def warning(self, message: str, *, title: str | None = None) -> None:
        self._annotation("warning", message, title)

    def error(self, message: str, *, title: str | None = None) -> None:
        self._annotation("error", message, title)

    def notice(self, message: str, *, title: str | None = None) -> None:
        self._annotation("notice", message, title)

    @contextmanager
    def group(self, title: str) -> Iterator[None]:
        """Fold the lines written in between (the certifier's log) in the job log."""
        if not self._in_actions:
            yield
            return
        self._command("group", title)
        try:
            yield
        finally:
            self._command("endgroup", "")

    @contextmanager
    def stop_commands(self) -> Iterator[None]:
        """Make the runner ignore workflow commands in what is logged in between (the
        certifier's output, which may quote data from the models or the dataset)."""
        if not self._in_actions:
            yield
            return
        resume = secrets.token_hex(16)
        self._command("stop-commands", resume)
        try:
            yield
        finally:
            self._write(f"::{resume}::")

    def _annotation(self, level: str, message: str, title: str | None) -> None:
        if not self._in_actions:
            prefix = f"{level}: " + (f"{title}: " if title else "")
            self._write(prefix + message)
            return
        props = f" title={escape_property(title)}" if title else ""
        self._write(f"::{level}{props}::{escape_data(message)}")

    def _command(self, name: str, value: str) -> None:
        self._write(f"::{name}::{escape_data(value)}")

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()
