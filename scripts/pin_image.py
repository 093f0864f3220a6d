#!/usr/bin/env python3
"""Pin the Action's default image to a digest: rewrite the `image` input's default in action.yml.

The release workflow runs it after pushing the image, so the release commit (and the tags
`vX.Y.Z` and `vX` that point at it) reference exactly the image that was built and tested:

    python scripts/pin_image.py action.yml ghcr.io/invarlock/invarlock sha256:<64 hex>

Only the one `default:` line of the `image` input changes; everything else is kept byte for
byte (no YAML round trip that would reformat the file).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
REPOSITORY = re.compile(r"[a-z0-9.-]+(?::[0-9]+)?(?:/[a-z0-9._-]+)+")


def pin(text: str, repository: str, digest: str) -> str:
    """`text` (action.yml) with the image input's default set to `repository@digest`."""
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"not an image digest: {digest!r} (expected sha256:<64 hex>)")
    if not REPOSITORY.fullmatch(repository):
        raise ValueError(f"not an image repository: {repository!r}")
    block = re.search(r"^  image:\n(?:    .*\n|      .*\n)*?    default: (.*)\n", text, flags=re.M)
    if block is None:
        raise ValueError("action.yml has no `image` input with a default")
    start, end = block.span(1)
    return text[:start] + f"{repository}@{digest}" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", type=Path)
    parser.add_argument("repository")
    parser.add_argument("digest")
    args = parser.parse_args(argv)
    try:
        text = pin(args.action.read_text(encoding="utf-8"), args.repository, args.digest)
    except ValueError as exc:
        print(f"pin_image: {exc}", file=sys.stderr)
        return 2
    args.action.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
