"""Where the reference a subject is judged against came from, and pins on it.

The reference is what sets the bar: the baseline, the evaluation data, the preset files and
the resolved policy (the thresholds). A gate that reads them from the change under test
compares the change with itself, so a run can say where each came from (a checkout of the
base branch, the pull request, or a local run) and can pin the baseline and the policy by
digest: a pinned digest that does not match what was loaded stops the run before anything is
evaluated (exit 2); the dataset can be pinned the same way (checked once it is read, before
the windows are cut). The certificate's `reference` section records the origin and the digest
of every item and, where the run compared the pull request's copy with the base checkout,
whether the pull request changed it (an approved change), so a reader need not guess.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock.enums import StrEnum
from invarlock.errors import InputError

_DIGEST = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


class Origin(StrEnum):
    """Where a reference item was read from."""

    LOCAL = "local"  # a run outside a pull request: the paths as given
    BASE_CHECKOUT = "base-checkout"  # a separate checkout of the pull request's base ref
    PULL_REQUEST = "pull-request"  # the pull request's own files (a reviewed change)
    PINNED = "pinned-digest"  # whatever the files, the digest matched a pin


@dataclass(frozen=True)
class Reference:
    """The origin of the reference files and the digests they are pinned to (if any)."""

    origin: Origin = Origin.LOCAL
    baseline_digest: str | None = None  # pin on the baseline's weights digest
    policy_digest: str | None = None  # pin on the resolved policy's digest
    dataset_digest: str | None = None  # pin on the corpus digest (checked once it is read)
    presets: tuple[Path, ...] = ()  # the preset files, recorded by content digest
    # What the pull request changed, compared with the base checkout: `baseline`, `dataset`,
    # `preset:<path as given>`; empty when nothing changed, None when nothing was compared.
    changed: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for item in self.changed or ():
            if item in ("baseline", "dataset"):
                continue
            if not (item.startswith("preset:")
                    and Path(item.removeprefix("preset:")) in self.presets):
                raise InputError(f"--reference-changed must be baseline, dataset, none or "
                                 f"preset:<one of the --preset files>, not {item!r}")


def parse_digest(value: str, what: str) -> str:
    """`sha256:<64 hex>` (the bare 64 hex digits are accepted); InputError naming `what`."""
    match = _DIGEST.fullmatch(value.strip().lower())
    if match is None:
        raise InputError(f"{what} must be sha256:<64 hex digits>, not {value!r}")
    return "sha256:" + match.group(1)


def check_policy_pin(reference: Reference | None, digest: str) -> None:
    """Stop when the resolved policy is not the pinned one (thresholds or sizes differ)."""
    if reference is None or reference.policy_digest is None:
        return
    if digest != reference.policy_digest:
        raise InputError(f"the resolved policy's digest {digest} does not match the pinned "
                         f"policy digest {reference.policy_digest}: the thresholds or window "
                         "sizes differ from the pinned reference; nothing was evaluated")


def check_baseline_pin(reference: Reference | None, digest: Callable[[], str]) -> None:
    """Stop when the baseline's weights are not the pinned ones (`digest` hashes them)."""
    if reference is None or reference.baseline_digest is None:
        return
    actual = digest()
    if actual != reference.baseline_digest:
        raise InputError(f"the baseline's weights digest {actual} does not match the pinned "
                         f"baseline digest {reference.baseline_digest}; nothing was evaluated")


def check_dataset_pin(reference: Reference | None, digest: str) -> None:
    """Stop when the evaluation data is not the pinned corpus (read, not yet evaluated)."""
    if reference is None or reference.dataset_digest is None:
        return
    if digest != reference.dataset_digest:
        raise InputError(f"the dataset's digest {digest} does not match the pinned dataset "
                         f"digest {reference.dataset_digest}; nothing was evaluated")


def record(reference: Reference | None, *, baseline_digest: str, dataset_digest: str,
           policy_digest: str) -> dict[str, Any]:
    """The certificate's `reference` section: each item's origin and digest."""
    ref = reference or Reference()
    changed = ref.changed

    def flag(name: str) -> dict[str, bool]:
        return {} if changed is None else {"changed": name in changed}

    def item(digest: str, pinned: str | None, name: str) -> dict[str, Any]:
        origin = Origin.PINNED if pinned is not None and pinned == digest else ref.origin
        return {"origin": str(origin), "digest": digest, **flag(name)}

    presets = [{"path": str(path), "origin": str(ref.origin), "digest": file_digest(path),
                **flag(f"preset:{path}")} for path in ref.presets]
    policy = item(policy_digest, ref.policy_digest, "policy")
    if changed is not None:  # the presets set the thresholds: a changed preset moves them
        policy["changed"] = any(p["changed"] for p in presets)
    return {
        "origin": str(ref.origin),
        "baseline": item(baseline_digest, ref.baseline_digest, "baseline"),
        "dataset": item(dataset_digest, ref.dataset_digest, "dataset"),
        "policy": policy,
        "presets": presets,
    }


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, `sha256:<hex>`."""
    h = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()
