"""`verify`'s check of a certificate's `reference` section against the evidence it describes.

The reference section says where the baseline, the dataset and the policy came from (the base
branch, a pinned digest, the pull request) and names each by digest; the evidence records the
same digests where it uses them (`baseline.weights_digest`, `dataset.digest`, `policy.digest`,
which verify recomputes from the recorded policy). Edited so that it names the base branch's
baseline while the numbers were measured against another, a certificate would claim a trusted
bar it was never judged against, and its content digest can be recomputed by anyone: so the
section must agree with the evidence, item by item, and with itself.

Pure: a certificate (a mapping) in, `(where, message)` pairs out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_PINNED = "pinned-digest"
_PULL_REQUEST = "pull-request"
# reference item -> where the evidence records the same digest
_EVIDENCE = {"baseline": ("baseline", "weights_digest"), "dataset": ("dataset", "digest"),
             "policy": ("policy", "digest")}


def reference_differences(cert: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every disagreement between `cert["reference"]` and the rest of the certificate (empty
    when there is no reference section; the schema has already checked its shape)."""
    ref = cert.get("reference")
    if not isinstance(ref, Mapping):
        return []
    found: list[tuple[str, str]] = []
    for name, (section, key) in _EVIDENCE.items():
        recorded = (cert.get(section) or {}).get(key)
        if ref[name]["digest"] != recorded:
            found.append((f"reference.{name}.digest",
                          f"names {ref[name]['digest']}, but the evidence was measured with "
                          f"{section}.{key} {recorded}"))
    found += _origin_differences(ref)
    found += _changed_differences(ref)
    return found


def _origin_differences(ref: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Each item was read from where the run read the reference, unless a pin matched it."""
    origin = ref["origin"]
    found = []
    if origin == _PINNED:
        found.append(("reference.origin", "a run reads its files from somewhere; "
                                          f"{_PINNED} is only an item's origin"))
    for name in _EVIDENCE:
        if ref[name]["origin"] not in (origin, _PINNED):
            found.append((f"reference.{name}.origin",
                          f"{ref[name]['origin']} differs from the run's origin {origin}"))
    for i, preset in enumerate(ref["presets"]):
        if preset["origin"] != origin:
            found.append((f"reference.presets[{i}].origin",
                          f"{preset['origin']} differs from the run's origin {origin}"))
    return found


def _changed_differences(ref: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`changed` flags: all or none recorded; a changed item is the pull request's own file
    (or matched a pin); the policy changed exactly when a preset did (the presets set the
    thresholds)."""
    items = [(f"reference.{n}", ref[n]) for n in _EVIDENCE]
    items += [(f"reference.presets[{i}]", p) for i, p in enumerate(ref["presets"])]
    flags = ["changed" in item for _, item in items]
    if any(flags) and not all(flags):
        return [("reference", "`changed` is recorded for some items only")]
    if not any(flags):
        return []
    found = [(f"{where}.changed", f"a changed item is read from the pull request, not "
                                  f"from {item['origin']}")
             for where, item in items
             if item["changed"] and item["origin"] not in (_PULL_REQUEST, _PINNED)]
    presets_changed = any(p["changed"] for p in ref["presets"])
    if ref["policy"]["changed"] != presets_changed:
        found.append(("reference.policy.changed",
                      f"is {str(ref['policy']['changed']).lower()}, but a preset "
                      f"{'was' if presets_changed else 'was not'} changed"))
    return found
