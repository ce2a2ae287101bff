"""No import cycles inside ``bimask_jax`` and ``pallas_kernels`` (issue 13 §4).

Reads every module's source with ``ast`` (nothing is imported) and collects each ``import`` /
``from ... import`` of a package module, at any depth (function-local imports count too), then
looks for a cycle in that graph.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("bimask_jax", "pallas_kernels")


def _modules():
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _resolve(name: str, modules) -> str | None:
    """The package module that importing ``name`` executes last (``a.b.c`` -> ``a.b.c``, or its
    longest prefix that is a module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import mod`` imports the module ``pkg.mod``; else ``pkg`` itself.
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                dep = _resolve(t, modules)
                if dep and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if colour.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in colour:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def _parent_edges(graph):
    """A package's ``__init__`` importing its own submodules is not a cycle (Python runs the
    submodule after the package object exists): drop the edges submodule -> enclosing package."""
    return {mod: {d for d in deps if not mod.startswith(d + ".")} for mod, deps in graph.items()}


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "bimask_jax.ops" in graph and "pallas_kernels.format" in graph
    cycle = find_cycle(_parent_edges(graph))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph,has_cycle",
    [
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_cycle_finder(graph, has_cycle):
    assert (find_cycle(graph) is not None) == has_cycle
