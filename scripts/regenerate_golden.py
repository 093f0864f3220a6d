#!/usr/bin/env python3
"""Rewrite the golden Markdown files of the Action's reports (tests/github/golden/).

Run after an intended change to the rendering, then review the diff:

    python scripts/regenerate_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.github.golden_cases import write_all


def main() -> int:
    for path in write_all():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
