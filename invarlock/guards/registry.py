"""Guards by name: the five built-ins, plus any registered by a plugin."""

from __future__ import annotations

from invarlock.errors import InputError
from invarlock.guards.base import Guard
from invarlock.guards.invariants import INVARIANTS
from invarlock.guards.rmt import RMT
from invarlock.guards.rows import ROWS
from invarlock.guards.spectral import SPECTRAL
from invarlock.guards.variance import VARIANCE

ENTRY_POINT_GROUP = "invarlock.guards"
BUILTIN = ("invariants", "spectral", "rows", "rmt", "variance")

_REGISTRY: dict[str, Guard] = {g.name: g for g in (
    INVARIANTS, SPECTRAL, ROWS, RMT, VARIANCE)}


class UnknownGuardError(InputError):
    """A guard name with no implementation installed (e.g. a plugin that is missing)."""


def register(guard: Guard) -> None:
    """Add a guard; its name and flag must be new and it must follow the `Guard` protocol."""
    if not isinstance(guard, Guard):
        raise TypeError(f"{guard!r} does not implement the invarlock Guard protocol "
                        "(name, flag, stages, measures, decide, probe)")
    if not guard.name.isidentifier():
        raise ValueError(f"guard name {guard.name!r} must be an identifier")
    if guard.name in _REGISTRY:
        raise ValueError(f"a guard named {guard.name!r} is already registered")
    if guard.flag in {g.flag for g in _REGISTRY.values()}:
        raise ValueError(f"validation flag {guard.flag!r} is already used by another guard")
    _REGISTRY[guard.name] = guard


def unregister(name: str) -> None:
    """Remove a plugin guard (built-ins stay)."""
    if name in BUILTIN:
        raise ValueError(f"built-in guard {name!r} cannot be removed")
    _REGISTRY.pop(name, None)


def get_guard(name: str) -> Guard:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownGuardError(f"guard {name!r} is not installed") from None


def guard_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
