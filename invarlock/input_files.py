"""Reading a file the user named: a regular file only, of bounded size, never blocking.

A FIFO, a device or a socket in place of a config, a certificate or a dataset would block a
plain `read()` forever or stream without end, and a multi-gigabyte file where kilobytes are
expected would be read whole before anything could complain. Both are found with one `fstat`
on a descriptor opened without blocking, before a byte is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from invarlock.errors import InputError
from invarlock.outdir import shown

MiB = 2**20
_SNIFF = 64 * 1024  # bytes looked at to tell text from binary


def _size(n: int) -> str:
    return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n:,} bytes"


def _open_regular(path: Path, what: str, limit: int) -> tuple[int, int]:
    """A descriptor of `path` and its size, after checking it is a regular file within
    `limit` bytes. Opened non-blocking, so a FIFO without a writer cannot hang the open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {shown(path)}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {shown(path)}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{what} {shown(path)} is a folder, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what} {shown(path)} is not a regular file (a FIFO, socket or "
                             "device); give a file")
        if info.st_size > limit:
            raise InputError(f"{what} {shown(path)} is {_size(info.st_size)}, more than the "
                             f"{_size(limit)} a {what} can be")
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def read_bytes(path: Path | str, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; InputError otherwise."""
    path = Path(path)
    fd, _size_now = _open_regular(path, what, limit)
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {shown(path)}: {exc.strerror or exc}") from None
    if len(data) > limit:  # it grew while being read
        raise InputError(f"{what} {shown(path)} is more than the {_size(limit)} a {what} "
                         "can be")
    return data


def read_text(path: Path | str, what: str, limit: int) -> str:
    """`read_bytes` decoded as UTF-8; a binary file is named as such by its first bad byte."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {shown(path)} is not UTF-8 text (byte {exc.start})") from None


def check_text_file(path: Path | str, what: str, limit: int) -> None:
    """A regular file within `limit` bytes whose first 64 KiB look like UTF-8 text (no NUL
    byte, no invalid sequence): a binary file is refused without being read whole."""
    path = Path(path)
    fd, _ = _open_regular(path, what, limit)
    with os.fdopen(fd, "rb") as fh:
        head = fh.read(_SNIFF)
    nul = head.find(b"\0")
    if nul >= 0:
        raise InputError(f"{what} {shown(path)} is binary, not text (a NUL byte at offset "
                         f"{nul})")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a character cut at the end of the sample is fine
            raise InputError(f"{what} {shown(path)} is not UTF-8 text (byte {exc.start})"
                             ) from None
