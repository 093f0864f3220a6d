"""Components by name: built-in ones, and those other distributions add through entry points.

Three entry-point groups extend InvarLock without changes to it:

- ``invarlock.adapters``: an `AdapterPlugin` that claims model architectures (config.json
  ``architectures[0]``), says how they are scored (an `AdapterKind`) and may bring its own
  loader. `invarlock.models.source.detect_adapter` and `invarlock.models.loading.load_model`
  consult these before the built-in rules.
- ``invarlock.edits``: an `invarlock.edits.Edit` (name, summary, parse_plan, apply), found by
  `invarlock.edits.get_edit` after the built-in edits.
- ``invarlock.guards``: a guard for the guard chain (see `invarlock.guards`).

An entry point may name the object itself or a zero-argument callable returning it. A plugin
that fails to load is listed with its error and otherwise ignored; built-in names win.
Nothing here imports torch, and nothing here imports the modules that consult it
(`invarlock.edits`, `invarlock.models`): the full listing, built-ins included, is
`invarlock.catalog`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from typing import Any

from invarlock.enums import ADAPTER_ALIASES, AdapterKind

log = logging.getLogger(__name__)

KINDS = ("adapters", "edits", "guards")
GROUPS = {kind: f"invarlock.{kind}" for kind in KINDS}
BUILTIN = "builtin"


@dataclass(frozen=True)
class AdapterPlugin:
    """What an ``invarlock.adapters`` entry point provides.

    `load(path, *, dtype, device)` returns a torch module in eval mode whose forward takes
    ``input_ids``/``attention_mask`` (and ``labels`` where the kind needs them) and returns
    an object with ``.logits``, like a transformers model; without it, the transformers
    Auto class of `kind` loads the checkpoint.
    """

    name: str
    kind: AdapterKind
    architectures: tuple[str, ...]
    summary: str = ""
    load: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", AdapterKind(self.kind))
        object.__setattr__(self, "architectures", tuple(self.architectures))


@dataclass(frozen=True)
class Component:
    """One listed component and where it comes from."""

    kind: str  # adapters | edits | guards
    name: str
    origin: str  # "builtin" or the distribution's name
    version: str | None  # the distribution's version (the tool's own for built-ins)
    target: str  # entry point value ("module:attr") or the built-in module
    summary: str = ""
    aliases: tuple[str, ...] = ()
    error: str | None = None  # why an entry point could not be used
    obj: Any = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "origin": self.origin,
                "version": self.version, "target": self.target, "summary": self.summary,
                "aliases": list(self.aliases), "error": self.error}


def refresh() -> None:
    """Forget discovered entry points (after installing a distribution in-process)."""
    _entry_point_components.cache_clear()


def discovered(kind: str) -> tuple[Component, ...]:
    """Entry-point components of one kind, those that failed to load included (with error)."""
    if kind not in GROUPS:
        raise ValueError(f"unknown component kind {kind!r}; use one of {', '.join(KINDS)}")
    return _entry_point_components(kind)


def adapter_plugins() -> list[AdapterPlugin]:
    """Adapter plugins that loaded, in discovery order."""
    reserved = builtin_adapter_names()
    return [c.obj for c in discovered("adapters") if c.error is None and c.name not in reserved]


def builtin_adapter_names() -> set[str]:
    """Names a plugin adapter cannot take: the built-in kinds and their aliases."""
    return {*(k.value for k in AdapterKind), *ADAPTER_ALIASES}


def adapter_plugin_for(config: dict[str, Any], requested: str = "auto") -> AdapterPlugin | None:
    """The plugin that claims this checkpoint's architecture (or is named by `requested`)."""
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else None
    for plugin in adapter_plugins():
        if requested not in ("auto", plugin.name):
            continue
        if architecture in plugin.architectures:
            return plugin
    return None


def adapter_plugin_names() -> list[str]:
    return [p.name for p in adapter_plugins()]


def edit_plugin(name: str) -> Any | None:
    """The `Edit` an entry point registers under `name`, if any (built-ins are looked up
    first by `invarlock.edits.get_edit`)."""
    for comp in discovered("edits"):
        if comp.error is None and comp.name == name:
            return comp.obj
    return None


def guard_plugins() -> dict[str, Any]:
    """Guard objects from ``invarlock.guards`` entry points, by name."""
    return {c.name: c.obj for c in discovered("guards") if c.error is None}


def register_guard_plugins() -> None:
    """Add every guard plugin to the guard registry (`invarlock.guards.register`), once.

    Called before a run's policy is resolved and before a certificate's guards are
    re-checked, so plugin guards can be configured, run, listed and verified like built-ins.
    """
    try:
        guards = importlib.import_module("invarlock.guards")
    except ImportError:
        return
    if not (hasattr(guards, "register") and hasattr(guards, "guard_names")):
        return  # a guard package without a registry: nothing to join
    known = set(guards.guard_names())
    for name, guard in guard_plugins().items():
        if name in known:
            continue
        try:
            guards.register(guard)
        except (TypeError, ValueError) as exc:  # protocol mismatch, flag taken, bad name
            log.warning("guard plugin %s cannot be registered: %s", name, exc)


# --- entry points ---------------------------------------------------------------------------

@cache
def _entry_point_components(kind: str) -> tuple[Component, ...]:
    seen: set[tuple[str, str]] = set()
    out = []
    for ep in _entry_points(GROUPS[kind]):
        if (ep.name, ep.value) in seen:  # one distribution visible twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        dist = getattr(ep, "dist", None)
        origin = dist.metadata["Name"] if dist is not None else "unknown distribution"
        version = dist.version if dist is not None else None
        comp = Component(kind, ep.name, origin, version, ep.value)
        try:
            obj = _materialise(ep.load())
            comp = _describe(comp, obj)
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("plugin %s (%s) from %s cannot be used: %s", ep.name, GROUPS[kind],
                        origin, exc)
            comp = with_error(comp, f"{type(exc).__name__}: {exc}")
        out.append(comp)
    return tuple(out)


def _entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=group)


def _materialise(obj: Any) -> Any:
    if callable(obj) and not isinstance(obj, type) and not _looks_like_component(obj):
        obj = obj()
    return obj


def _looks_like_component(obj: Any) -> bool:
    return any(hasattr(obj, attr) for attr in ("name", "kind", "apply", "parse_plan"))


def _describe(comp: Component, obj: Any) -> Component:
    """Check the object fits its group; take its name and summary."""
    if comp.kind == "adapters":
        if not isinstance(obj, AdapterPlugin):
            raise TypeError("an adapters entry point must provide invarlock.plugins.AdapterPlugin")
        if obj.name != comp.name:
            raise ValueError(f"entry point '{comp.name}' provides adapter '{obj.name}'")
        summary = obj.summary or f"{', '.join(obj.architectures)} as {obj.kind.value}"
        return Component(comp.kind, comp.name, comp.origin, comp.version, comp.target, summary,
                         obj=obj)
    if comp.kind == "guards":
        for attr in ("name", "flag", "decide", "probe"):
            if not hasattr(obj, attr):
                raise TypeError(f"a guards entry point must provide a guard following "
                                f"invarlock.guards.Guard (missing '{attr}')")
        if obj.name != comp.name:
            raise ValueError(f"entry point '{comp.name}' provides guard '{obj.name}'")
    if comp.kind == "edits":
        for attr in ("name", "parse_plan", "apply"):
            if not hasattr(obj, attr):
                raise TypeError(f"an edits entry point must provide an invarlock.edits.Edit "
                                f"(missing '{attr}')")
    return Component(comp.kind, comp.name, comp.origin, comp.version, comp.target,
                     summary_of(obj), obj=obj)


def summary_of(obj: Any) -> str:
    """A component's one-line description: `summary`, `measures`, or its docstring."""
    for attr in ("summary", "measures"):
        value = getattr(obj, attr, None)
        if isinstance(value, str) and value:
            return value
    return (obj.__doc__ or "").strip().split("\n")[0]


def with_error(comp: Component, error: str) -> Component:
    return Component(comp.kind, comp.name, comp.origin, comp.version, comp.target,
                     comp.summary, comp.aliases, error)
