#!/usr/bin/env python3
"""Cut GitHub's REST description down to the operations the Action calls.

The GitHub API stand-in used by the tests (tests/github/standin.py) validates every request
and its own responses against these schemas, so the subset must hold each operation with
every component it references. Regenerate after changing the operations the client uses:

    python scripts/github_openapi_subset.py \
        path/to/octokit-openapi-<version>.api.github.com.json.gz \
        tests/data/github/openapi-subset.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

OPERATIONS = (
    "checks/create",
    "checks/get",
    "checks/update",
    "checks/list-for-ref",
    "issues/list-comments",
    "issues/create-comment",
    "issues/get-comment",
    "issues/update-comment",
    "issues/delete-comment",
    "pulls/get",
    "rate-limit/get",
    "users/get-authenticated",
)
METHODS = ("get", "put", "post", "patch", "delete")


def _strip_extensions(node: Any) -> Any:
    """Drop `x-octokit` keys (client-generator hints, not part of the API)."""
    if isinstance(node, dict):
        return {k: _strip_extensions(v) for k, v in node.items() if not k.startswith("x-octokit")}
    if isinstance(node, list):
        return [_strip_extensions(v) for v in node]
    return node


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref)
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def subset(description: dict[str, Any], operations: tuple[str, ...]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    wanted = set(operations)
    for path, item in description["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op and op.get("operationId") in wanted:
                paths.setdefault(path, {})[method] = op
                wanted.discard(op["operationId"])
    if wanted:
        raise SystemExit(f"operations not in the description: {', '.join(sorted(wanted))}")
    components: dict[str, dict[str, Any]] = {}
    pending = _refs(paths)
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, section, name = ref.split("/")  # "#/components/<section>/<name>"
        target = description["components"][section][name]
        components.setdefault(section, {})[name] = target
        pending |= _refs(target) - seen
    return _strip_extensions({
        "openapi": description["openapi"],
        "info": {
            "title": "Subset of GitHub v3 REST API used by the InvarLock Action",
            "version": description["info"]["version"],
            "description": "Operations " + ", ".join(operations) + " and every component "
                           "they reference, from github/rest-api-description "
                           "(descriptions/api.github.com/api.github.com.json) as redistributed "
                           "in npm @octokit/openapi; x-octokit keys removed. MIT licensed.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {s: dict(sorted(v.items())) for s, v in sorted(components.items())},
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("description", type=Path, help="api.github.com.json or .json.gz")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    opener = gzip.open if args.description.suffix == ".gz" else open
    with opener(args.description, "rt", encoding="utf-8") as fh:
        description = json.load(fh)
    result = subset(description, OPERATIONS)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
