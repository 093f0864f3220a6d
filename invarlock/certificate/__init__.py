"""The Safety Certificate: schema, canonical digest, atomic writing, loading, rendering."""

from invarlock.certificate.document import (
    CERT_FILENAME,
    MARKDOWN_FILENAME,
    canonical_json,
    content_digest,
    load_certificate,
    schema,
    schema_errors,
    seal,
    write_certificate,
)

__all__ = [
    "CERT_FILENAME",
    "MARKDOWN_FILENAME",
    "canonical_json",
    "content_digest",
    "load_certificate",
    "schema",
    "schema_errors",
    "seal",
    "write_certificate",
]
