"""The architecture, read from the source: layers point one way and nothing imports in a loop.

    ref/ (numpy and the standard library) <- weights/ <- fast/ <- bench/ <- gpt2/

Every import in every module of the five packages is parsed with `ast` (those inside
functions too: a lazy import upward is still an upward dependency), resolved to a module of
the project, and checked: no module imports a package of a higher layer, the module graph has
no cycle, and ref/ imports nothing outside numpy and the standard library.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["ref", "weights", "fast", "bench", "gpt2"]  # bottom to top


def _modules() -> dict[str, str]:
    """{dotted module name: path} for every .py file of the five packages."""
    out = {}
    for pkg in LAYERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3]
                    name = rel.replace(os.sep, ".").removesuffix(".__init__")
                    out[name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the module: `import a.b` gives a.b,
    `from a import b` gives a.b where that is a module and a otherwise; relative imports are
    resolved against the module's package."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, node.lineno))
    return out


def _project_target(imported: str) -> str | None:
    """The project module an import names (the longest prefix that is one), or None."""
    parts = imported.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in MODULES:
            return cand
    return None


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


GRAPH = {
    name: sorted({(t, line) for imp, line in _imports(name, path) if (t := _project_target(imp))})
    for name, path in MODULES.items()
}


def test_the_packages_are_found():
    # the walk really finds the tree (a typo in ROOT would make every check below vacuous)
    for must in ("ref.model", "weights.loader", "fast.numba.backend", "bench.cli", "gpt2.cli"):
        assert must in MODULES, must
    assert sum(len(v) for v in GRAPH.values()) > 100


def test_no_module_imports_a_higher_layer():
    bad = [
        f"{MODULES[m]}:{line} imports {t}"
        for m, edges in GRAPH.items()
        for t, line in edges
        if _layer(t) > _layer(m)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_loop():
    """Depth-first search for a back edge in the module graph (a package's own __init__
    importing its submodules is an edge like any other)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    loops: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t, _ in GRAPH[m]:
            if t == m:
                continue
            if state.get(t) == 1:
                loops.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_ref_needs_numpy_alone():
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__", "ref"}
    bad = [
        f"{path}:{line} imports {imp}"
        for name, path in MODULES.items()
        if name.split(".")[0] == "ref"
        for imp, line in _imports(name, path)
        if imp.split(".")[0] not in allowed
    ]
    assert not bad, "ref/ must import numpy and the standard library only:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, imported",
    [
        ("weights/x.py", "gpt2.progress"),  # upward
        ("ref/x.py", "torch"),  # a third-party library in the spec
    ],
)
def test_the_checks_catch_a_violation(tmp_path, source, imported):
    """The checks above fail on a violation (run on a module written for the purpose)."""
    mod = tmp_path / "x.py"
    mod.write_text(f"import {imported}\n", encoding="utf-8")
    name = source[:-3].replace("/", ".")
    imps = _imports(name, str(mod))
    if source.startswith("ref/"):
        assert imps[0][0].split(".")[0] not in set(sys.stdlib_module_names) | {"numpy"}
    else:
        t = _project_target(imps[0][0])
        assert t is not None and _layer(t) > _layer(name)
