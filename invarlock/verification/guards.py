"""Guard sections re-decided from their stored measurements by each guard's pure `recheck`.

Guards are found through `invarlock.guards` and its plugins at run time, so a certificate
written with a guard this installation lacks is reported, not crashed on.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from invarlock import gate
from invarlock.errors import InvarlockError
from invarlock.verification.findings import Findings


def stopping_guard(cert: Mapping[str, Any], guard_checks: list[gate.Check]) -> str | None:
    """The guard whose failure stopped the run before evaluation, as the sections show it:
    that guard measured and failed (its recomputed check), every other guard was not
    measured. Then no final set was evaluated, and none may be stored."""
    sections = list(cert["guards"].items())
    measured = [(name, check) for (name, section), check in zip(sections, guard_checks,
                                                                strict=True)
                if _measured(section)]
    if len(measured) != 1 or measured[0][1].passed:
        return None
    name = measured[0][0]
    others_unmeasured = all(not _measured(section) for other, section in sections
                            if other != name)
    return name if others_unmeasured else None


def _measured(section: Mapping[str, Any]) -> bool:
    measurements = section.get("measurements")
    return not isinstance(measurements, Mapping) or measurements.get("evaluated", True) is not False


def guard_modes(cert: Mapping[str, Any]) -> list[str]:
    return [str(section.get("mode")) for section in cert["guards"].values()]


def recheck_guards(cert: Mapping[str, Any], found: Findings) -> list[gate.Check]:
    """One check per guard section: recomputed by the guard's own pure `recheck`."""
    checks = []
    values = cert["policy"]["values"]
    for name, section in cert["guards"].items():
        found.checked.append(f"guard {name}")
        where = f"guards.{name}"
        flag = section.get("flag")
        stored = gate.Check(str(flag), bool(section.get("passed")), str(section.get("reason")))
        if not isinstance(flag, str) or not isinstance(section.get("passed"), bool):
            found.differ(where, "a guard section needs a string `flag` and a boolean `passed`")
            checks.append(stored)
            continue
        policy_mode = (values.get("guards") or {}).get(name, {}).get("mode")
        if policy_mode is not None and policy_mode != section.get("mode"):
            found.differ(f"{where}.mode", f"{section.get('mode')!r} but the policy says "
                                          f"{policy_mode!r}")
        recomputed, why = _guard_recheck(name, section, values)
        if recomputed is None:
            found.differ(where, why if why.startswith("cannot re-check") else
                         f"cannot re-check guard {name} ({why})")
            checks.append(stored)
            continue
        found.compare(where, {"flag": flag, "passed": section["passed"],
                              "reason": section.get("reason")},
                      {"flag": recomputed.flag, "passed": recomputed.passed,
                       "reason": recomputed.reason})
        for part, value in _guard_details(name, section, values).items():
            if part in section:
                found.compare(f"{where}.{part}", section[part], value)
        checks.append(recomputed)
    return checks


def _guard_recheck(name: str, section: Mapping[str, Any],
                   values: Mapping[str, Any]) -> tuple[gate.Check | None, str]:
    """`invarlock.guards.recheck`, or why it cannot run here."""
    try:
        guards = importlib.import_module("invarlock.guards")
    except ImportError:
        return None, "invarlock.guards is not installed"
    from invarlock import plugins

    plugins.register_guard_plugins()
    recheck = getattr(guards, "recheck", None)
    if recheck is None:
        return None, "this installation's invarlock.guards has no recheck"
    guard_policy = dict((values.get("guards") or {}).get(name) or {})
    try:
        return recheck(name, dict(section), guard_policy), ""
    except InvarlockError as exc:  # e.g. the guard is not installed here
        return None, str(exc)
    except Exception as exc:  # malformed measurements, or a plugin's own failure
        return None, f"{type(exc).__name__}: {exc}"


def _guard_details(name: str, section: Mapping[str, Any],
                   values: Mapping[str, Any]) -> dict[str, Any]:
    """Findings and summary as the guard's pure `decide` recomputes them (when it can)."""
    try:
        guards = importlib.import_module("invarlock.guards")
        decision = guards.get_guard(name).decide(
            section["measurements"], dict((values.get("guards") or {}).get(name) or {}))
    except Exception:  # already reported through recheck, or no decide to call
        return {}
    return {"findings": [dict(f) for f in getattr(decision, "findings", ())],
            "summary": dict(getattr(decision, "summary", {}) or {})}
