"""Imports point one way: the plugin registry sits below the modules that consult it, and
the certificate package below the pipeline that fills it; and modules stay a size one can
read in one sitting.

The graph is read from the source (every `import`, at module level or inside a function,
since a deferred import is still a dependency), so a circle shows even when Python happens to
resolve it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "invarlock"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, known: set[str]) -> set[str]:
    """Modules of the package that a file imports (the most specific module each names)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]  # falls back to module
        for name in names:
            parts = name.split(".")
            for i in range(len(parts), 1, -1):
                if ".".join(parts[:i]) in known:
                    out.add(".".join(parts[:i]))
                    break
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: _imported(ast.parse(path.read_text("utf-8")), known) - {name}
            for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_graph_reader_sees_deferred_imports():
    graph = import_graph()
    assert "invarlock.plugins" in graph["invarlock.edits"]  # imported inside get_edit
    assert "invarlock.certify" in graph["invarlock.commands.certify"]  # inside its body


def test_plugin_registry_is_in_no_import_circle():
    graph = import_graph()
    below = reachable(graph, "invarlock.plugins")
    assert "invarlock.plugins" not in below
    assert not {"invarlock.edits", "invarlock.models.source", "invarlock.models",
                "invarlock.catalog"} & below


def test_edits_and_model_sources_do_not_import_each_other_back():
    graph = import_graph()
    for module in ("invarlock.edits", "invarlock.models.source"):
        assert module not in reachable(graph, module), f"{module} imports itself back"


def test_certificate_package_does_not_import_the_pipeline():
    """The certificate's shape is built from plain values; the pipeline uses it, not back."""
    graph = import_graph()
    certificate = [m for m in graph if m == "invarlock.certificate"
                   or m.startswith("invarlock.certificate.")]
    assert "invarlock.certificate.build" in certificate
    for module in certificate:
        assert "invarlock.certify" not in reachable(graph, module), module


def _imports_of(graph: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    """Each module at or under `prefix` mapped to what it imports."""
    return {m: deps for m, deps in graph.items() if m == prefix or m.startswith(prefix + ".")}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_data_does_not_reach_into_models():
    """Reading a corpus needs no model code: the network probe lives in a neutral module."""
    graph = import_graph()
    for module, deps in _imports_of(graph, "invarlock.data").items():
        assert not {d for d in deps if _under(d, "invarlock.models")}, module


def test_guard_decision_side_does_not_import_the_measurement_side():
    """`verify` re-decides guards from a certificate without torch: base.py and the
    guards' decisions stay clear of `invarlock.guards.measure`."""
    graph = import_graph()
    deciding = ["invarlock.guards.base", "invarlock.guards.registry"]
    for module in deciding:
        below = reachable(graph, module)
        assert not {d for d in below if _under(d, "invarlock.guards.measure")}, module


def test_model_formats_and_loading_do_not_import_each_other():
    graph = import_graph()
    assert "invarlock.models.loading" not in reachable(graph, "invarlock.models.formats")
    for module in ("invarlock.models.formats", "invarlock.models.loading"):
        assert module not in reachable(graph, module), f"{module} imports itself back"


# --- module size ------------------------------------------------------------------------------

MAX_LINES = 600  # a module one can read in one sitting; past it, split along its sections


def _line_counts() -> dict[str, int]:
    return {_module_name(p): len(p.read_text("utf-8").splitlines())
            for p in PACKAGE.rglob("*.py")}


def test_no_module_grows_past_the_size_limit():
    too_long = {m: n for m, n in _line_counts().items() if n > MAX_LINES}
    assert not too_long, (f"over {MAX_LINES} lines, split along its sections: {too_long}")


def test_the_split_modules_stay_thin():
    """`cli` assembles the commands and `verify` runs the verification sections in order;
    the work lives in `invarlock.commands` and `invarlock.verification`."""
    counts = _line_counts()
    assert counts["invarlock.cli"] <= 100 and counts["invarlock.verify"] <= 120
    graph = import_graph()
    assert {"invarlock.commands.certify", "invarlock.commands.verify"} <= graph["invarlock.cli"]
    assert "invarlock.verification.recompute" in graph["invarlock.verify"]


def test_certify_runs_the_stages_and_no_stage_imports_it_back():
    """`certify` runs the stages in order; each stage's body lives in `invarlock.stages`,
    which never reaches `invarlock.certify` (nor do the evaluation parts reach `evaluate`)."""
    counts = _line_counts()
    assert counts["invarlock.certify"] <= 150
    graph = import_graph()
    stages = _imports_of(graph, "invarlock.stages")
    assert {"invarlock.stages.inputs", "invarlock.stages.plan", "invarlock.stages.baseline",
            "invarlock.stages.subject", "invarlock.stages.judge",
            "invarlock.stages.write"} <= graph["invarlock.certify"]
    for module in stages:
        assert "invarlock.certify" not in reachable(graph, module), module
    for module in _imports_of(graph, "invarlock.evaluation"):
        assert "invarlock.evaluate" not in reachable(graph, module), module


GITHUB_MODULE_LINES = 500  # a module of the Action's package is read in one sitting
ENTRYPOINT_LINES = 200  # main.py reads settings, dispatches and fails closed, nothing more


def test_the_actions_modules_stay_small_and_main_only_dispatches():
    sizes = {p.name: len(p.read_text("utf-8").splitlines())
             for p in (PACKAGE / "github").glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > GITHUB_MODULE_LINES} == {}
    assert sizes["main.py"] <= ENTRYPOINT_LINES
    graph = import_graph()
    for mode in ("invarlock.github.certify_mode", "invarlock.github.downloaded",
                 "invarlock.github.lifecycle", "invarlock.github.targets"):
        assert "invarlock.github.main" not in reachable(graph, mode), mode  # one way: main → modes


def test_the_reference_table_is_pure_and_renderers_do_not_publish():
    """The reference table is certificate in, text out; the report renderers never reach
    the publisher or the entrypoint."""
    graph = import_graph()
    assert reachable(graph, "invarlock.github.origin") <= {"invarlock.untrusted"}
    assert not {"invarlock.github.publish", "invarlock.github.main"} & reachable(
        graph, "invarlock.github.render")
