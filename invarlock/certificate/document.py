"""Certificate documents: JSON Schema check, content digest, atomic write, load.

The digest is sha256 over the canonical JSON of every field except `digest` itself
(sorted keys, compact separators, UTF-8, no NaN): any later change to the content shows.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from invarlock import atomic
from invarlock.errors import InputError, TamperedCertificateError

CERT_FILENAME = "evaluation.cert.json"
MARKDOWN_FILENAME = "evaluation.cert.md"


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


def write_certificate(cert: dict[str, Any], out_dir: Path, markdown: str) -> Path:
    """Write the Markdown rendering, then the JSON (each atomically); return the JSON path.

    The JSON goes last: its presence means the whole certificate was written.
    """
    out_dir = Path(out_dir)
    atomic.write_text(out_dir / MARKDOWN_FILENAME, markdown)
    text = json.dumps(cert, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic.write_text(out_dir / CERT_FILENAME, text)


def load_certificate(path: str | Path) -> dict[str, Any]:
    """Read a certificate file (or the certificate inside a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CERT_FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"certificate not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read certificate {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TamperedCertificateError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise TamperedCertificateError(f"{path}: a certificate is a JSON object")
    return data
