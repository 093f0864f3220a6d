"""The output folder of a run: checked, probed and locked before anything is evaluated.

A run that cannot write its certificate should say so in its first second, not after the
evaluation; and two runs writing into one folder would leave a certificate set that belongs
to neither. `claim` creates the folder (remembering what it created), writes and removes a
probe file, and takes an exclusive lock (`flock` on a lock file inside the folder, released
by the kernel if the process dies). `release` drops the lock and removes the folders it
created when the run left nothing in them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from invarlock.errors import InputError

try:  # POSIX; elsewhere runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".invarlock.lock"
PROBE_PREFIX = ".invarlock-probe-"
_SHOWN = 80  # characters of a path shown in a message


def shown(path: Path | str) -> str:
    """A path as a message shows it: long ones shortened in the middle."""
    text = str(path)
    return text if len(text) <= _SHOWN else f"{text[:40]}…{text[-30:]}"


@dataclass
class OutputFolder:
    """A claimed output folder; `release()` gives it back."""

    path: Path
    created: list[Path] = field(default_factory=list)  # folders this claim made, outermost first
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only when empty: a run that wrote its certificate keeps it
            except OSError:
                break
        self.created = []

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_folder_target(path: Path, what: str) -> None:
    """A folder that will be written later can be: not a file, not under a file, names fit."""
    for part in path.parts:
        if len(part.encode("utf-8")) > 255:
            raise InputError(f"{what} {shown(path)}: a path component is longer than 255 bytes")
    try:
        if path.exists() and not path.is_dir():
            raise InputError(f"{what} {shown(path)} is a file, not a folder")
        ancestor = path
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as exc:
        raise InputError(f"{what} {shown(path)} cannot be used: "
                         f"{exc.strerror or exc}") from None
    if not ancestor.is_dir():
        raise InputError(f"{what} {shown(path)} cannot be created: {shown(ancestor)} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{what} {shown(path)} cannot be created: {shown(ancestor)} is not "
                         "writable")


def claim(path: Path, what: str = "output folder",
          check: Callable[[Path], None] | None = None) -> OutputFolder:
    """Create, probe and lock `path`; one clear InputError (exit 2) for anything in the way.

    `check`, when given, inspects what the folder already holds once the lock is taken (so
    no other run can change it meanwhile) and raises to refuse it."""
    path = Path(path)
    check_folder_target(path, what)
    folder = OutputFolder(path)
    try:
        _create(folder, what)
        _probe(path, what)
        folder._fd = _lock(path, what)
        if check is not None:
            check(path)
    except BaseException:
        folder.release()
        raise
    return folder


def _create(folder: OutputFolder, what: str) -> None:
    missing = []
    p = folder.path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(f"cannot create {what} {shown(folder.path)}: "
                             f"{exc.strerror or exc}") from None
        folder.created.append(p)


def _probe(path: Path, what: str) -> None:
    probe = path / f"{PROBE_PREFIX}{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"probe")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise InputError(f"{what} {shown(path)} is not writable: "
                         f"{exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def _lock(path: Path, what: str) -> int | None:
    if fcntl is None:
        return None
    lock = path / LOCK_NAME
    for _ in range(5):  # another run may remove the lock file between our open and flock
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot lock {what} {shown(path)}: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise InputError(f"{what} {shown(path)} is in use by another run "
                                 f"({holder or 'holder unknown'}); wait for it to finish or "
                                 "choose another --out") from None
            raise InputError(f"cannot lock {what} {shown(path)}: "
                             f"{exc.strerror or exc}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _write_holder(fd)
            return fd
        os.close(fd)
    raise InputError(f"cannot lock {what} {shown(path)}: the lock file keeps changing")


def _write_holder(fd: int) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode("utf-8"), 0)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
