"""The package layout (README "Layout"): private names stay in their module, imports never go round in a
circle, dependencies point one way (front ends -> gadget stages -> estimation/physics; io used by all) and
the gadget's stage modules stay short.  Checked on the source with ``ast``, without importing it."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from _helpers import REPO_ROOT

PACKAGE_DIR = REPO_ROOT / "gadgets" / "kmotion"
MAX_GADGET_LINES = 400

# (package, what its modules must not import, exceptions): the one-way dependencies of the layout
_TOP = ("kmotion.frontends", "kmotion.cli", "kmotion.demo")
FORBIDDEN = (
    ("kmotion.physics", ("kmotion",), ("kmotion.physics",)),
    ("kmotion.io", ("kmotion.gadget", "kmotion.simulation", "kmotion.estimation", *_TOP), ()),
    ("kmotion.simulation", ("kmotion.gadget", *_TOP), ()),
    ("kmotion.estimation", ("kmotion.gadget", *_TOP), ()),
    ("kmotion.gadget", _TOP, ()),
)


def package_sources(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Source text of every module of the package, by dotted name (``kmotion.gadget`` for its __init__)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path.read_text()
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(
    module: str, tree: ast.AST, modules: Mapping[str, str]
) -> Iterator[tuple[ast.AST, str, str | None, str]]:
    """Every import of ``tree``, module level or inside functions: (node, module, name or None, local name).

    ``from P import x`` gives module ``P.x`` and name None when ``P.x`` is a module, else module ``P`` and
    name ``x``; ``import a.b`` binds the local name ``a.b``.  Relative imports are resolved.
    """
    is_package = any(m.startswith(module + ".") for m in modules)
    base = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, None, alias.asname or alias.name
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                target = ".".join([*anchor, target] if target else anchor)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                local = alias.asname or alias.name
                if sub in modules:
                    yield node, sub, None, local
                else:
                    yield node, target, alias.name, local


def private_name_uses(modules: Mapping[str, str]) -> list[str]:
    """``from X import _name`` and ``X._name`` where ``X`` is another module of the package."""
    found = []
    for module, text in modules.items():
        tree = ast.parse(text)
        bound: dict[str, str] = {}  # local name -> the package module it names
        for node, target, name, local in _imports(module, tree, modules):
            if target not in modules or target == module:
                continue
            if name is None:
                bound[local] = target
            elif _is_private(name):
                found.append(f"{module}:{node.lineno}: from {target} import {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner = ast.unparse(node.value)
                if owner in bound:
                    found.append(f"{module}:{node.lineno}: {owner}.{node.attr} ({bound[owner]})")
    return found


def import_graph(modules: Mapping[str, str]) -> dict[str, set[str]]:
    """Module -> package modules it imports (module level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for module, text in modules.items():
        deps = {t for _, t, _, _ in _imports(module, ast.parse(text), modules) if t in modules}
        graph[module] = deps - {module}
    return graph


def import_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state and (cycle := visit(d)) is not None:
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            return cycle
    return None


def wrong_way_imports(graph: Mapping[str, set[str]]) -> list[str]:
    """Imports against the layout's direction (:data:`FORBIDDEN`)."""
    bad = []
    for package, forbidden, allowed in FORBIDDEN:
        for module, deps in graph.items():
            if module != package and not module.startswith(package + "."):
                continue
            for d in sorted(deps):
                if any(d == f or d.startswith(f + ".") for f in forbidden) and not any(
                    d == a or d.startswith(a + ".") for a in allowed
                ):
                    bad.append(f"{module} imports {d}")
    return bad


def long_modules(modules: Mapping[str, str], package: str, limit: int) -> list[str]:
    """Modules of ``package`` longer than ``limit`` lines."""
    return [
        f"{m}: {n} lines"
        for m, text in modules.items()
        if (m == package or m.startswith(package + ".")) and (n := len(text.splitlines())) > limit
    ]


@pytest.fixture(scope="module")
def modules() -> dict[str, str]:
    return package_sources()


def test_no_module_uses_another_modules_private_names(modules: dict[str, str]) -> None:
    assert private_name_uses(modules) == []


def test_no_import_cycle(modules: dict[str, str]) -> None:
    assert import_cycle(import_graph(modules)) is None


def test_dependencies_point_one_way(modules: dict[str, str]) -> None:
    assert wrong_way_imports(import_graph(modules)) == []


def test_gadget_modules_are_short(modules: dict[str, str]) -> None:
    assert "kmotion.gadget.pipeline" in modules
    assert long_modules(modules, "kmotion.gadget", MAX_GADGET_LINES) == []


def test_the_checks_flag_violations() -> None:
    """Each check on a small synthetic package: it must find what it is there to find."""
    fake = {
        "kmotion": "",
        "kmotion.io": "",
        "kmotion.io.a": "_hidden = 1\nVISIBLE = 2\n",
        "kmotion.io.b": "from kmotion.io.a import _hidden, VISIBLE\n",
        "kmotion.io.c": "import kmotion.io.a as a\n\n\ndef f():\n    return a._hidden\n",
        "kmotion.io.d": "from kmotion.io import a\nx = a._hidden\n",
        "kmotion.io.e": "from . import a\nfrom .a import _hidden\n",
        "kmotion.io.ok": "from kmotion.io.a import VISIBLE\n_own = 1\nprint(_own, VISIBLE.__class__)\n",
        "kmotion.gadget": "",
        "kmotion.gadget.x": "def f():\n    from kmotion.gadget import y\n",
        "kmotion.gadget.y": "from kmotion.gadget.x import f\nfrom kmotion.frontends import z\n",
        "kmotion.frontends": "",
        "kmotion.frontends.z": "",
        "kmotion.physics": "",
        "kmotion.physics.p": "from kmotion.io.a import VISIBLE\nfrom kmotion.physics import q\n",
        "kmotion.physics.q": "",
    }
    found = private_name_uses(fake)
    assert [f.split(":")[0] for f in found] == [
        "kmotion.io.b",
        "kmotion.io.c",
        "kmotion.io.d",
        "kmotion.io.e",
    ]
    graph = import_graph(fake)
    assert graph["kmotion.gadget.x"] == {"kmotion.gadget.y"}  # a function-local import is an edge
    cycle = import_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "kmotion.gadget.x" in cycle
    assert import_cycle({k: v for k, v in graph.items() if k != "kmotion.gadget.x"}) is None
    assert wrong_way_imports(graph) == [
        "kmotion.physics.p imports kmotion.io.a",
        "kmotion.gadget.y imports kmotion.frontends.z",
    ]
    sizes = {
        "kmotion.gadget.big": "x = 1\n" * 401,
        "kmotion.gadget.ok": "x\n" * 400,
        "kmotion.io.big": "x\n" * 999,
    }
    assert long_modules(sizes, "kmotion.gadget", 400) == ["kmotion.gadget.big: 401 lines"]
