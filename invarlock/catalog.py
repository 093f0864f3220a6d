"""Every component by kind, built-in and from plugins: what `invarlock plugins` lists.

This sits above both the built-in registries (`invarlock.edits`, `invarlock.guards`, the
adapter kinds) and the entry-point discovery (`invarlock.plugins`), so that neither of those
needs to import the other. A plugin whose name a built-in already takes is listed with an
error and never used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from invarlock import __version__, plugins
from invarlock.enums import ADAPTER_ALIASES, AdapterKind
from invarlock.plugins import BUILTIN, GROUPS, KINDS, Component

__all__ = ["KINDS", "components", "distributions_in_use"]


def components(kind: str | None = None) -> list[Component]:
    """Built-in components, then entry-point ones, of one kind or of all kinds."""
    kinds = KINDS if kind is None else (kind,)
    out: list[Component] = []
    for k in kinds:
        if k not in GROUPS:
            raise ValueError(f"unknown component kind {k!r}; use one of {', '.join(KINDS)}")
        builtins = _BUILTINS[k]()
        taken = {name for c in builtins for name in (c.name, *c.aliases)}
        out += builtins
        for comp in plugins.discovered(k):
            if comp.name in taken and comp.error is None:
                comp = plugins.with_error(comp, f"name taken by a built-in {k[:-1]}")
            out.append(comp)
    return out


def distributions_in_use(config: dict[str, Any], requested_adapter: str = "auto",
                         edit_name: str | None = None) -> dict[str, str | None]:
    """Distribution -> version of the plugins a run uses (its adapter, its edit), for the
    certificate's record of the software that produced it."""
    used: dict[str, str | None] = {}
    adapter = plugins.adapter_plugin_for(config, requested_adapter)
    for comp in components():
        if comp.origin == BUILTIN or comp.error is not None:
            continue
        if (comp.kind == "adapters" and adapter is not None and comp.obj is adapter) or (
                comp.kind == "edits" and comp.name == edit_name):
            used[comp.origin] = comp.version
    return used


def _builtin_adapters() -> list[Component]:
    summaries = {
        AdapterKind.CAUSAL_LM: "causal LMs (*ForCausalLM, *LMHeadModel): perplexity",
        AdapterKind.MASKED_LM: "masked LMs (*ForMaskedLM): masked-token perplexity",
        AdapterKind.SEQ_CLS: "sequence classifiers (*ForSequenceClassification): accuracy",
    }
    out = []
    for kind, summary in summaries.items():
        aliases = tuple(a for a, k in ADAPTER_ALIASES.items() if k is kind and a != kind.value)
        out.append(Component("adapters", kind.value, BUILTIN, __version__,
                             "invarlock.models", summary, aliases))
    return out


def _builtin_edits() -> list[Component]:
    from invarlock.edits import EDITS

    return [Component("edits", e.name, BUILTIN, __version__, "invarlock.edits", e.summary,
                      obj=e) for e in EDITS.values()]


def _builtin_guards() -> list[Component]:
    try:
        from invarlock import guards
    except ImportError:
        return []
    out = []
    for name in getattr(guards, "BUILTIN", ()):
        obj = guards.get_guard(name)
        out.append(Component("guards", str(name), BUILTIN, __version__, "invarlock.guards",
                             plugins.summary_of(obj), obj=obj))
    return out


_BUILTINS: dict[str, Callable[[], list[Component]]] = {
    "adapters": _builtin_adapters, "edits": _builtin_edits, "guards": _builtin_guards,
}
