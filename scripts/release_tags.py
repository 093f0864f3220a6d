#!/usr/bin/env python3
"""Plan a release's tags before anything is pushed: refuse a version that exists, and move
the major tag (`v1`) only forward.

The release workflow runs it on the tags of this repository and of the action repository
(`git ls-remote --tags` output, concatenated) and appends its answer to $GITHUB_OUTPUT:

    python scripts/release_tags.py 1.2.3 --package-version 1.2.3 --tags tags.txt

prints `major=1`, `move-major=true|false` (the version is the newest `v1.x.y`, so `v1` may
point at it) and `latest=true|false` (the newest release of all: the action repository's
`main` and the "Latest" GitHub Release follow it). A malformed version, one that differs
from the package version, or one already tagged, is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

VERSION = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
RELEASE_TAG = re.compile(r"(?:refs/tags/)?v(\d+\.\d+\.\d+)(?:\^\{\})?")


@dataclass(frozen=True)
class TagPlan:
    version: str
    major: str
    move_major: bool
    latest: bool

    def outputs(self) -> str:
        flag = {True: "true", False: "false"}
        return (f"major={self.major}\nmove-major={flag[self.move_major]}\n"
                f"latest={flag[self.latest]}\n")


def parse(version: str) -> tuple[int, int, int]:
    match = VERSION.fullmatch(version)
    if match is None:
        raise ValueError(f"version must be X.Y.Z (numbers, no leading zeros): {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def released_versions(lines: Iterable[str]) -> set[tuple[int, int, int]]:
    """The X.Y.Z of every `vX.Y.Z` tag in `lines` (tag names or `git ls-remote` lines)."""
    found = set()
    for line in lines:
        ref = line.split()[-1] if line.split() else ""
        match = RELEASE_TAG.fullmatch(ref)
        if match and VERSION.fullmatch(match.group(1)):
            found.add(parse(match.group(1)))
    return found


def plan(version: str, package_version: str, tag_lines: Iterable[str]) -> TagPlan:
    """What the release of `version` may tag, given the tags that exist."""
    new = parse(version)
    if version != package_version:
        raise ValueError(f"version {version} is not the package version {package_version} "
                         "(pyproject.toml)")
    released = released_versions(tag_lines)
    if new in released:
        raise ValueError(f"v{version} is already released (its tag exists); "
                         "a release is never made twice: bump the version")
    same_major = [v for v in released if v[0] == new[0]]
    return TagPlan(version=version, major=str(new[0]),
                   move_major=all(v < new for v in same_major),
                   latest=all(v < new for v in released))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version")
    parser.add_argument("--package-version", required=True)
    parser.add_argument("--tags", type=Path, required=True,
                        help="file of existing tags (`git ls-remote --tags` output)")
    args = parser.parse_args(argv)
    try:
        lines = args.tags.read_text(encoding="utf-8").splitlines()
        result = plan(args.version, args.package_version, lines)
    except (OSError, ValueError) as exc:
        print(f"release_tags: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.outputs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
