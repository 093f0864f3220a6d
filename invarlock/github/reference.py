"""A trusted reference for a pull request: the bar is read from the base branch, not the PR.

The baseline, the evaluation data and the preset files (which set the policy: thresholds and
window sizes) decide what "as good as before" means. Read from the pull request under test,
they let a change swap the bar together with the subject. With `reference-path` (a separate
checkout of the base ref) each reference path is read from that checkout instead, and the pull
request's copy is compared with it: a pull request that changes, adds or removes any of them
is refused before anything is evaluated, with the changes named in the check run, unless the
change was approved (`allow-reference-change`, set only by a job in a protected environment;
docs/action.md, "A trusted reference"). `baseline-digest`, `policy-digest` and
`dataset-digest` pin them by digest on top (checked by the certifier before it evaluates).
The certifier records where each item came from in the certificate's `reference` section.

Trust also decides the baseline cache's namespace: a fork's run reads and writes the
`untrusted` namespace only, so nothing it computes is ever read by a trusted run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from invarlock.errors import InputError, InvarlockError
from invarlock.github.event import Target
from invarlock.github.outcome import EXIT_INPUT, Outcome
from invarlock.github.settings import CertifyInputs, Settings

log = logging.getLogger(__name__)

NAMED_DATASETS = ("demo", "wikitext2")  # dataset specs that are no file of the repository
_CHUNK = 1 << 20


class ReferenceChangeError(InputError):
    """The pull request changes the reference and nobody approved it (exit 2)."""


@dataclass(frozen=True)
class Item:
    """One reference path: `shown` as the repository names it, the PR's copy and the base's."""

    kind: str  # baseline | dataset | preset
    shown: str
    head: Path
    base: Path
    given: str = ""  # the input as written (a preset is recorded by it)

    @property
    def recorded(self) -> str:
        """The item as `invarlock certify --reference-changed` names it."""
        return f"preset:{self.given}" if self.kind == "preset" else self.kind


@dataclass(frozen=True)
class Change:
    item: Item
    how: str  # changed | added by the pull request | removed by the pull request

    def describe(self) -> str:
        return f"{self.item.kind} `{self.item.shown}` ({self.how})"


@dataclass(frozen=True)
class Prepared:
    """What the certifier is run with, or why it is not run at all."""

    inputs: CertifyInputs
    arguments: tuple[str, ...] = ()  # certify flags for the origin, pins and cache namespace
    refusal: Outcome | None = None


def prepare(settings: Settings, target: Target | None, *, cwd: Path | None = None,
            warn: Callable[[str], None] = log.warning) -> Prepared:
    """The certify inputs read from the trusted reference; never raises (a refusal is an
    Outcome the entrypoint reports like any other error)."""
    try:
        return _prepare(settings, target, Path.cwd() if cwd is None else cwd, warn)
    except InvarlockError as exc:
        return Prepared(settings.certify, refusal=Outcome.failed(exc.exit_code, str(exc)))
    except OSError as exc:  # an unreadable reference file: no comparison, no evaluation
        return Prepared(settings.certify, refusal=Outcome.failed(
            EXIT_INPUT, f"cannot compare the reference with the base checkout: "
                        f"{exc.strerror or exc}: {exc.filename}"))


def _prepare(settings: Settings, target: Target | None, cwd: Path,
             warn: Callable[[str], None]) -> Prepared:
    ref = settings.reference
    namespace = "untrusted" if target is not None and target.fork else "trusted"
    arguments = [f"--cache-namespace={namespace}"]
    if ref.baseline_digest:
        arguments.append(f"--baseline-digest={ref.baseline_digest}")
    if ref.policy_digest:
        arguments.append(f"--policy-digest={ref.policy_digest}")
    if ref.dataset_digest:
        arguments.append(f"--dataset-digest={ref.dataset_digest}")
    pull_request = target is not None and target.pull_request is not None
    if not ref.path:
        if pull_request and not (ref.baseline_digest and ref.policy_digest
                                 and ref.dataset_digest):
            warn("The baseline, dataset and presets are read from the pull request under "
                 "test; set reference-path to a checkout of the base ref (docs/action.md, "
                 "\"A trusted reference\").")
        origin = "pull-request" if pull_request else "local"
        return Prepared(settings.certify, (f"--reference-origin={origin}", *arguments))
    root = settings.repository_root or cwd
    base_root = _folder(root / ref.path, "reference-path")  # like actions/checkout's `path`
    items = reference_items(settings.certify, cwd=cwd, repository=root, base_root=base_root)
    changes = compare(items)
    if changes and not ref.allow_change:
        listed = "; ".join(c.describe() for c in changes)
        raise ReferenceChangeError(
            f"the pull request changes the reference: {listed}. The baseline, dataset and "
            "presets set the bar the subject is judged against, so a change to them needs "
            "approval (allow-reference-change from the protected environment, "
            "docs/action.md \"A trusted reference\"); nothing was evaluated")
    if changes:
        warn("Reference change approved (allow-reference-change): "
             + "; ".join(c.describe() for c in changes) + ". The pull request's files are used.")
        changed = [f"--reference-changed={c.item.recorded}" for c in changes]
        return Prepared(settings.certify, ("--reference-origin=pull-request", *changed,
                                           *arguments))
    return Prepared(rebase(settings.certify, items),
                    ("--reference-origin=base-checkout", "--reference-changed=none",
                     *arguments))


def reference_items(inputs: CertifyInputs, *, cwd: Path, repository: Path,
                    base_root: Path) -> list[Item]:
    """The reference paths among the inputs, each with its counterpart in the base checkout.

    Paths are relative to `cwd` (the working directory) and must stay inside `repository`
    (the workspace); the same repository path is looked up under `base_root`."""
    specs = [("baseline", inputs.baseline)]
    if inputs.dataset and inputs.dataset not in NAMED_DATASETS \
            and not inputs.dataset.startswith("hf:"):
        specs.append(("dataset", inputs.dataset))
    specs += [("preset", p) for p in inputs.presets]
    items = []
    repository = Path(os.path.realpath(repository))
    cwd = Path(os.path.realpath(cwd))
    for kind, value in specs:
        if not value:
            continue  # the bundled demo model
        # lexically: a link the pull request put in place of a reference path is compared
        # as a link (a change), never followed to a file the base branch also has
        lexical = Path(os.path.normpath(cwd / value))
        try:
            relative = lexical.relative_to(repository)
        except ValueError:
            raise InputError(f"{kind} {value!r} is outside the workspace; in reference mode "
                             "every reference path is a repository path") from None
        items.append(Item(kind, relative.as_posix(), lexical, base_root / relative, value))
    return items


def compare(items: list[Item]) -> list[Change]:
    """The items whose content differs between the pull request and the base checkout."""
    changes = []
    for item in items:
        head = item.head.exists() or item.head.is_symlink()
        base = item.base.exists() or item.base.is_symlink()
        if head and not base:
            changes.append(Change(item, "added by the pull request"))
        elif base and not head:
            changes.append(Change(item, "removed by the pull request"))
        elif head and (_listing(item.head) != _listing(item.base)
                       or tree_digest(item.head) != tree_digest(item.base)):
            changes.append(Change(item, "changed"))  # names and sizes first: no hashing
    return changes


def _listing(path: Path) -> list[tuple[str, int]]:
    """Names and sizes (links by name only): a cheap first comparison before the digests."""
    if path.is_symlink() or path.is_file():
        return [("", -1 if path.is_symlink() else path.stat().st_size)]
    return [(name, -1 if (path / name).is_symlink() else (path / name).stat().st_size)
            for name in sorted(_walk(path))]


def rebase(inputs: CertifyInputs, items: list[Item]) -> CertifyInputs:
    """The inputs with each reference path pointing into the base checkout."""
    by_kind: dict[str, list[str]] = {}
    for item in items:
        by_kind.setdefault(item.kind, []).append(str(item.base))
    return replace(inputs,
                   baseline=by_kind.get("baseline", [inputs.baseline])[0],
                   dataset=by_kind.get("dataset", [inputs.dataset])[0],
                   presets=tuple(by_kind.get("preset", ())))


def tree_digest(path: Path) -> str:
    """sha256 over a file, or over a folder's files (relative path, size and content, in
    sorted order); a symbolic link counts by its target's name, never followed."""
    h = hashlib.sha256()
    if path.is_symlink():
        h.update(b"link\0" + os.readlink(path).encode("utf-8"))
        return h.hexdigest()
    if path.is_file():
        _hash_file(h, path)
        return h.hexdigest()
    for entry in sorted(_walk(path)):
        full = path / entry
        h.update(entry.encode("utf-8") + b"\0")
        if full.is_symlink():
            h.update(b"link\0" + os.readlink(full).encode("utf-8") + b"\0")
        else:
            h.update(full.stat().st_size.to_bytes(8, "little"))
            _hash_file(h, full)
    return h.hexdigest()


def _walk(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in (*files, *(d for d in dirs if (Path(folder) / d).is_symlink())):
            found.append((Path(folder) / name).relative_to(root).as_posix())
    return found


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            h.update(block)


def _folder(path: Path, name: str) -> Path:
    if not path.is_dir():
        raise InputError(f"input '{name}' must be a folder holding a checkout of the base "
                         f"ref, not {str(path)!r}")
    return path
