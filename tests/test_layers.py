"""The package's import graph has no circles: each module imports only modules below it
(operator → workers → solvers → service/CLI, the way the data flow goes). Every import counts —
at the top, inside functions, and under ``TYPE_CHECKING`` (a type a lower module needs belongs
in a protocol below both)."""
import ast
import os
import subprocess
import sys

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hessdist")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def imports(path: str, modules: set[str]) -> set[str]:
    """The package's modules that the file at ``path`` imports."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = [os.path.join(d, f) for d, _, files in os.walk(PACKAGE) for f in files if f.endswith(".py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that lies on one (depth-first search)."""
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_package():
    edges = graph()
    assert "hessdist.workers.group" in edges and edges["hessdist.operator"]     # the graph is read
    assert circles(edges) == []


def test_the_process_group_layer_imports_without_ray():
    """A GPU machine without Ray (the device suite's fallback) can still import what a rank runs:
    the collectives, the basis slice and the worker class."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import hessdist.workers.collectives, hessdist.workers.slice_basis, hessdist.workers.worker\n"
            "import hessdist.workers\n"
            "try:\n    hessdist.workers.WorkerGroup\nexcept ImportError:\n    print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
