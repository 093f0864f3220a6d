"""Certificate documents: JSON Schema check, content digest, atomic write, load.

The digest is sha256 over the canonical JSON of every field except `digest` itself
(sorted keys, compact separators, UTF-8, no NaN): any later change to the content shows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from invarlock import atomic
from invarlock.errors import InputError, TamperedCertificateError
from invarlock.input_files import read_text
from invarlock.outdir import shown

CERT_FILENAME = "evaluation.cert.json"
MARKDOWN_FILENAME = "evaluation.cert.md"
HTML_FILENAME = "evaluation.report.html"
SET_FILENAMES = (CERT_FILENAME, MARKDOWN_FILENAME, HTML_FILENAME)  # one run's certificate set
MAX_DEPTH = 64  # nesting a certificate never needs; deeper input is refused, not recursed into


@cache
def schema() -> dict[str, Any]:
    text = resources.files("invarlock.certificate").joinpath("schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(schema(), format_checker=FormatChecker())


def schema_errors(cert: dict[str, Any]) -> list[str]:
    """Every schema violation as `path: message`, sorted by path (empty when valid)."""
    errors = sorted(_validator().iter_errors(cert), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in errors]


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def strict_json(data: Any, **options: Any) -> str:
    """JSON every parser accepts: NaN and infinities (not JSON) become null.

    Printed to a CI log, no part of it reads as a workflow command: `::` and `##[` (which
    can only occur inside strings) are written with `\\u` escapes, the same JSON value."""
    text = json.dumps(_finite(data), allow_nan=False, **options)
    return text.replace("::", ":\\u003a").replace("##[", "#\\u0023[")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def content_digest(cert: dict[str, Any]) -> str:
    body = {k: v for k, v in cert.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def seal(cert: dict[str, Any]) -> dict[str, Any]:
    """Add the content digest and check the result against the schema (a bug if it fails)."""
    sealed = {**cert, "digest": content_digest(cert)}
    problems = schema_errors(sealed)
    if problems:
        raise ValueError("certificate does not match its schema: " + "; ".join(problems[:5]))
    return sealed


def write_certificate(cert: dict[str, Any], out_dir: Path, markdown: str,
                      renderings: dict[str, str] | None = None) -> Path:
    """Write the certificate set (JSON, Markdown, other renderings) as a unit; the JSON path.

    Every file is first written and synced in a staging folder beside the target, so a full
    disk or a write error leaves the folder as it was. Then the previous set's JSON is
    removed, the renderings are renamed in, and the JSON goes last: a certificate JSON
    present in the folder always belongs with the renderings next to it, and files of an
    older run that the new set does not replace are removed.
    """
    out_dir = Path(out_dir)
    files = {MARKDOWN_FILENAME: markdown, **(renderings or {})}
    files[CERT_FILENAME] = json.dumps(cert, indent=2, ensure_ascii=False,
                                      allow_nan=False) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".invarlock-set-", dir=out_dir))
    try:
        for name, text in files.items():
            atomic.write_text(staging / name, text)
        target = out_dir / CERT_FILENAME
        target.unlink(missing_ok=True)  # from here on, no older JSON vouches for new files
        stale = [out_dir / name for name in SET_FILENAMES if name not in files]
        try:
            for name in files:
                if name != CERT_FILENAME:
                    os.replace(staging / name, out_dir / name)
            for path in stale:
                path.unlink(missing_ok=True)
            os.replace(staging / CERT_FILENAME, target)
        except BaseException:
            for name in files:  # renderings never stay without their JSON
                (out_dir / name).unlink(missing_ok=True)
            raise
        _fsync_dir(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _fsync_dir(path: Path) -> None:
    """Make the renames durable (where the platform can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


MAX_CERTIFICATE_BYTES = 512 * 2**20


def load_certificate(path: str | Path) -> dict[str, Any]:
    """Read a certificate file (or the certificate inside a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CERT_FILENAME
    try:
        data = json.loads(read_text(path, "certificate", MAX_CERTIFICATE_BYTES))  # no FIFO
    except RecursionError:
        raise TamperedCertificateError(f"{shown(path)}: JSON nested too deeply to be a "
                                       "certificate") from None
    except FileNotFoundError:
        raise InputError(f"certificate not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read certificate {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TamperedCertificateError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise TamperedCertificateError(f"{path}: a certificate is a JSON object")
    if nesting_depth(data) > MAX_DEPTH:
        raise TamperedCertificateError(f"{shown(path)}: JSON nested deeper than {MAX_DEPTH} "
                                       "levels; a certificate is not")
    return data


def nesting_depth(data: Any) -> int:
    """Deepest nesting of lists and objects, counted without recursion."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth)
            todo += [(child, depth + 1) for child in node if isinstance(child, (dict, list))]
    return deepest
