"""The package layering, read from the source with ``ast`` (every import, module level and
inside functions): compiler is the bottom, passes and report sit on it, runtime on those, and
nothing imports upward; no circle between packages; no module over 800 lines; only
``compiler/collectives.py`` calls JAX's collectives."""
import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autoshard")
PACKAGES = ("compiler", "passes", "report", "runtime", "models", "benchmark")

#: What each layer may import (besides itself); ``autoshard.errors`` and ``autoshard.compat`` (the
#: JAX version differences, which imports only JAX) are everyone's.
ALLOWED = {
    "compiler": {"errors", "compat"},
    "passes": {"compiler", "errors", "compat"},
    "report": {"compiler", "errors", "compat"},
    "runtime": {"compiler", "passes", "report", "errors", "compat"},
}

#: JAX's collectives (and the device index along an axis), by the name ``jax.lax`` gives them.
COLLECTIVES = {"psum", "pmax", "pmin", "pmean", "psum_scatter", "all_gather", "all_to_all", "ppermute",
               "pshuffle", "axis_index"}


def _modules() -> dict[str, str]:
    """``{dotted module name: file}`` of every module of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


MODULES = _modules()


def imports_of(name: str, source: str | None = None, is_package: bool | None = None) -> list[tuple[str, int]]:
    """``(imported autoshard module, line)`` for every import in module ``name`` (its file, or
    ``source``), relative imports resolved; ``from pkg import sub`` names the submodule when
    ``sub`` is one."""
    if source is None:
        source, is_package = open(MODULES[name]).read(), MODULES[name].endswith("__init__.py")
    tree = ast.parse(source)
    package = name if is_package else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            for a in node.names:
                sub = f"{full}.{a.name}"
                found.append((sub if sub in MODULES else full, node.lineno))
    return [(m, line) for m, line in found if m == "autoshard" or m.startswith("autoshard.")]


def layer(name: str) -> str:
    """``compiler``, ``passes``, ... for a module of those packages; the module's own name
    (``errors``, ``cli``, ``autoshard``) for the modules at the top."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in PACKAGES:
        return parts[1]
    return parts[1] if len(parts) >= 2 else "autoshard"


GRAPH = {name: imports_of(name) for name in MODULES}


def upward_imports(package: str, graph: dict) -> list[str]:
    return [f"{name} imports {target} (line {line})"
            for name, targets in graph.items() if layer(name) == package
            for target, line in targets
            if layer(target) not in ALLOWED[package] | {package}]


def test_the_import_reader_sees_function_level_and_relative_imports():
    # What the compiler's op files did before this layering: reach up to the runtime from
    # inside a function, relatively.
    source = "from . import register\n\ndef lower(x):\n    from ...runtime import collectives\n    return x\n"
    found = imports_of("autoshard.compiler.ops.fake", source, is_package=False)
    assert found == [("autoshard.compiler.ops", 1), ("autoshard.runtime", 4)]
    assert upward_imports("compiler", {"autoshard.compiler.ops.fake": found}) == [
        "autoshard.compiler.ops.fake imports autoshard.runtime (line 4)"]
    # ``from .. import collectives`` names the module; ``from .. import make_mesh`` the package.
    assert ("autoshard.compiler.collectives", 1) in imports_of(
        "autoshard.compiler.ops.fake", "from .. import collectives\n", is_package=False)
    assert any(m == "autoshard" for m, _ in GRAPH["autoshard.benchmark.measure"])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_downwards(package):
    wrong = upward_imports(package, GRAPH)
    assert not wrong, "\n".join(wrong)


def test_no_circle_between_packages():
    edges = defaultdict(set)
    for name, targets in GRAPH.items():
        for target, _ in targets:
            if layer(target) != layer(name):
                edges[layer(name)].add(layer(target))
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"
    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_no_module_over_800_lines():
    long = {name: n for name, path in MODULES.items() if (n := sum(1 for _ in open(path))) > 800}
    assert not long, long


def test_only_compiler_collectives_calls_jax_collectives():
    callers = []
    for name, path in MODULES.items():
        if name == "autoshard.compiler.collectives":
            continue
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                base = node.value
                if (isinstance(base, ast.Name) and base.id == "lax") or (
                        isinstance(base, ast.Attribute) and base.attr == "lax"):
                    callers.append(f"{name}:{node.lineno} lax.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module in ("jax.lax", "jax._src.lax.parallel"):
                callers += [f"{name}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
    assert not callers, callers
