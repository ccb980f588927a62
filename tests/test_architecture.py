"""The house's import direction: a lower layer never imports a higher one, and no module circles.

Every ``fx_spectral/**/*.py`` is parsed with :mod:`ast` (nothing is imported): top-level and
function-local ``import`` / ``from … import`` statements, and ``importlib.import_module("fx_spectral…")``
with a string literal, give the module graph. Each file has a layer in :data:`LAYERS` (the same
table as docs/architecture.md, which must name every entry); an import may go down or sideways,
never up, and the graph has no cycle. What is wrong today is listed in :data:`KNOWN_UPWARD` and
:data:`KNOWN_CYCLES`: those lists only shrink (an entry that no longer happens fails the test, so
it gets deleted when it is fixed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fx_spectral"
DOC = ROOT / "docs" / "architecture.md"

#: file (relative to fx_spectral/; a key ending in "/" covers a whole folder) -> layer.
#: 0 ground floor (torch only) · 1 eager SN, projection ops, method registry · 2 graph pass, backend,
#: sharded math, bounds · 3 constrain handle, certificates · 4 integrations, demos, CLI, package face.
LAYERS: dict[str, int] = {
    "errors.py": 0,
    "kinds.py": 0,
    "models.py": 0,
    "msign.py": 0,
    "matrices.py": 0,
    "power.py": 0,
    "coupling.py": 0,
    "deprecation.py": 0,
    "constraints.py": 1,  # shim of projections.py
    "projections.py": 1,
    "methods.py": 1,
    "nn.py": 1,
    "sn_autograd.py": 1,
    "sn_operator.py": 1,
    "sn_modules.py": 1,
    "graph/": 2,
    "distributed.py": 2,
    "operator_norms.py": 2,
    "conv_bounds.py": 2,
    "operator_norm.py": 2,  # deprecated shim of operator_norms
    "distributed_projection.py": 2,
    "lipschitz.py": 2,
    "selection.py": 2,
    "constrain.py": 3,  # shim of constraint.py + selection.py
    "constraint.py": 3,
    "certify_rules.py": 3,
    "certify_graph.py": 3,
    "certificates.py": 3,
    "certify.py": 3,  # deprecated shim of certificates
    "integrations/": 4,
    "demos/": 4,
    "cli.py": 4,
    "__main__.py": 4,
    "__init__.py": 4,
}

#: (importer, imported) pairs that go upward today. Only ever remove entries.
KNOWN_UPWARD: set[tuple[str, str]] = set()

#: Strongly connected components (as sets of files) that exist today. Only ever remove entries.
KNOWN_CYCLES: set[frozenset[str]] = set()

#: Files that may name another module's private members: the old module paths kept for a release
#: (shims re-export what older code and pickles name) and nn.py, whose split-off files' private
#: names it re-exports under the old ``fx_spectral.nn._name`` spelling.
COMPAT_FACES: set[str] = {"nn.py", "constraints.py", "constrain.py", "graph/transform.py"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every file of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fx_spectral modules ``module`` imports anywhere in its file (function bodies included)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:  # `from fx_spectral import projections` imports the submodule
                sub = f"{name}.{alias.name}"
                found.add(sub if sub in modules else name)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {m for m in found if m in modules and m != module}


def _file(module: str, modules: dict[str, Path]) -> str:
    return modules[module].relative_to(PKG).as_posix()


def _layer(file: str) -> int | None:
    if file in LAYERS:
        return LAYERS[file]
    folders = [k for k in LAYERS if k.endswith("/") and file.startswith(k)]
    return LAYERS[max(folders, key=len)] if folders else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """File -> the files it imports."""
    modules = _modules()
    return {_file(m, modules): {_file(d, modules) for d in _imports(m, p, modules)} for m, p in modules.items()}


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_file_has_a_layer_and_every_layer_entry_exists(graph):
    missing = sorted(f for f in graph if _layer(f) is None)
    assert not missing, f"add these files to LAYERS (and docs/architecture.md): {missing}"
    stale = sorted(k for k in LAYERS if not (k.endswith("/") and (PKG / k).is_dir()) and k not in graph)
    assert not stale, f"LAYERS names files that do not exist: {stale}"


def test_no_import_goes_to_a_higher_layer(graph):
    upward = {(a, b) for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "imports to a higher layer (importer, imported): " + ", ".join(f"{a} -> {b}" for a, b in new)
    fixed = sorted(KNOWN_UPWARD - upward)
    assert not fixed, f"no longer happening, delete from KNOWN_UPWARD: {fixed}"


def test_no_import_cycle(graph):
    cycles = {frozenset(c) for c in _components(graph)}
    new = [sorted(c) for c in cycles - KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    fixed = [sorted(c) for c in KNOWN_CYCLES - cycles]
    assert not fixed, f"no longer a cycle, delete from KNOWN_CYCLES: {fixed}"


def test_the_checker_sees_function_local_and_string_imports(tmp_path):
    """The parser itself: a local import, a relative import and import_module all count."""
    pkg = tmp_path / "fx_spectral"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("")
    (pkg / "mid.py").write_text("def f():\n    from . import low\n")
    (pkg / "top.py").write_text("import importlib\nX = importlib.import_module('fx_spectral.mid')\n")
    modules = {
        "fx_spectral": pkg / "__init__.py",
        **{f"fx_spectral.{n}": pkg / f"{n}.py" for n in "low mid top".split()},
    }
    assert _imports("fx_spectral.mid", modules["fx_spectral.mid"], modules) == {"fx_spectral.low"}
    assert _imports("fx_spectral.top", modules["fx_spectral.top"], modules) == {"fx_spectral.mid"}
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _components(ring) == [{"a", "b", "c"}]


def test_the_documentation_names_every_layer_entry():
    text = DOC.read_text(encoding="utf-8")
    absent = sorted(k for k in LAYERS if f"`{k}`" not in text)
    assert not absent, f"docs/architecture.md does not list: {absent}"


def _private_uses(module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """``from fx_spectral.x import _name`` and ``x._name`` on an imported fx_spectral module, where x is
    not ``module``'s own package (a package may use its own private submodules)."""
    own = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fx_spectral") and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif a.name.startswith("_") and not a.name.startswith("__") and node.module != own:
                    found.append(f"from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fx_spectral") and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_members():
    modules = _modules()
    bad = {}
    for m, p in modules.items():
        if _file(m, modules) in COMPAT_FACES:
            continue
        uses = _private_uses(m, p, modules)
        if uses:
            bad[_file(m, modules)] = uses
    assert not bad, f"private members of other modules: {bad}"


def test_the_private_access_checker_sees_both_spellings(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from fx_spectral.nn import _names\nfrom fx_spectral import power as P\nP._hidden\n")
    modules = {"fx_spectral.power": path, "fx_spectral.nn": path}
    assert _private_uses("fx_spectral.x", path, modules) == ["from fx_spectral.nn import _names", "P._hidden"]
