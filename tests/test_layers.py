"""The package's layers, as ``docs/architecture.md`` ("Layers and who knows whom") states them.

Every module under ``pyro_seqlatent/`` is read with :mod:`ast` (nothing is imported): every
``import x`` and ``from x import y``, at module level or inside a function (lazy), relative ones
resolved, plus ``importlib.import_module("literal")``. Each module belongs to one layer of
:data:`LAYERS`, which mirrors the table in the docs row by row; an import of another part of the
package that its row does not allow fails, as does a cycle between modules (lazy imports
included) and a Pyro import where the row says "no". A subprocess checks that importing
:mod:`pyro_seqlatent.em` does not load Pyro.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pyro_seqlatent"
SOURCE = ROOT / PACKAGE
DOC = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Layer:
    """One row of the table: the parts of the package a layer's modules may import
    (``knows``; its own layer is always allowed), those it may import only inside functions
    (``lazily``), and whether its modules may import Pyro themselves."""

    knows: frozenset[str] = field(default_factory=frozenset)
    lazily: frozenset[str] = field(default_factory=frozenset)
    pyro: bool = True


def _layer(knows: str = "", lazily: str = "", pyro: bool = True) -> Layer:
    return Layer(frozenset(knows.split()), frozenset(lazily.split()), pyro)


# The rows of docs/architecture.md's table, in its order. Keys are what ``layer_of`` returns: a
# subpackage's name or a top-level module's file name.
LAYERS: dict[str, Layer] = {
    "__init__.py": _layer(pyro=False),
    "parallel.py": _layer(pyro=False),
    "testing.py": _layer("parallel.py", pyro=False),
    "nn": _layer(),
    "transforms": _layer("nn"),
    "guides": _layer("transforms nn"),
    "em": _layer("parallel.py", pyro=False),
    "data": _layer("nn"),
    "registry.py": _layer(lazily="models experiments", pyro=False),
    "models": _layer("guides transforms nn data em registry.py", lazily="infer"),
    "infer": _layer("guides transforms nn parallel.py registry.py"),
    "experiments": _layer("models guides transforms nn infer em data registry.py parallel.py "
                          "testing.py"),
    "cli.py": _layer("experiments models guides transforms nn infer em data registry.py "
                     "parallel.py testing.py"),
}


# ------------------------------------------------------------------------------ reading imports
@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. pyro_seqlatent.infer.train
    target: str  # imported module (of the package, or the top-level name of another one)
    line: int
    lazy: bool  # inside a function


def module_files(source: Path = SOURCE) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (``__init__`` files give
    the package's name)."""
    out = {}
    for path in sorted(source.rglob("*.py")):
        parts = list(path.relative_to(source.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve(module: str, level: int, name: str | None, files: dict[str, Path]) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if not level:
        return name or ""
    base = module.split(".")
    if not _is_package(module, files):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def read_imports(module: str, path: Path, files: dict[str, Path]) -> list[Import]:
    """Every import in ``path`` (see the module docstring), as targets inside the package
    (module names of ``files``) or top-level names of other packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def add(target: str, node: ast.AST, lazy: bool) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            while target not in files and "." in target:  # a name from a module: the module
                target = target.rsplit(".", 1)[0]
        else:
            target = target.split(".")[0]
        found.append(Import(module, target, node.lineno, lazy))

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, lazy)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, child.level, child.module, files)
                # ``from pkg import submodule`` imports the submodule (as ``import
                # pkg.submodule`` does, the package's __init__ is not counted); any other name
                # comes from ``base`` itself
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in files else base, child, lazy)
            elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                  and child.func.attr == "import_module" and child.args
                  and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)):
                add(child.args[0].value, child, lazy)
            visit(child, inner)

    visit(tree, False)
    return found


def layer_of(module: str, files: dict[str, Path]) -> str:
    """The row of :data:`LAYERS` of ``module``: its subpackage, or its file name at the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__.py"
    if len(parts) == 2 and not _is_package(module, files):
        return parts[1] + ".py"
    return parts[1]


def all_imports(source: Path = SOURCE) -> tuple[dict[str, Path], list[Import]]:
    files = module_files(source)
    return files, [imp for name, path in files.items() for imp in read_imports(name, path, files)]


def layer_violations(files: dict[str, Path], imports: list[Import],
                     layers: dict[str, Layer] = LAYERS) -> list[str]:
    """One line per import that the table does not allow."""
    problems = []
    for name in files:
        if layer_of(name, files) not in layers:
            problems.append(f"{name} belongs to no layer of the table ({layer_of(name, files)})")
    for imp in imports:
        where = f"{imp.source} (line {imp.line})"
        own = layer_of(imp.source, files)
        rule = layers.get(own)
        if rule is None:
            continue
        if imp.target == "pyro":
            if not rule.pyro:
                problems.append(f"{where}: {own} imports Pyro, which its row forbids")
            continue
        if imp.target not in files:
            continue  # another package (torch, numpy, ...)
        other = layer_of(imp.target, files)
        if other == own or other in rule.knows:
            continue
        if other in rule.lazily:
            if not imp.lazy:
                problems.append(f"{where}: {own} imports {imp.target} at module level; "
                                f"{other} only inside functions")
            continue
        problems.append(f"{where}: {own} imports {imp.target} ({other}), which its row does "
                        "not allow")
    return problems


def import_cycles(files: dict[str, Path], imports: list[Import]) -> list[list[str]]:
    """The cycles of the module graph (lazy imports included), each as its list of modules
    (Tarjan's strongly connected components of more than one module, or a self-import)."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for imp in imports:
        if imp.target in files:
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


# ------------------------------------------------------------------------------ the doc's table
def doc_table() -> dict[str, tuple[set[str], set[str], bool]]:
    """``{layer: (knows, lazily, pyro)}`` parsed from the table of ``docs/architecture.md``."""
    text = DOC.read_text()
    section = text.split("## Layers and who knows whom", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    out = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name, knows, lazily, pyro = cells[0], cells[1], cells[2], cells[3]

        def names(cell: str) -> set[str]:
            return {n.rstrip("/") for n in re.findall(r"`([^`]+)`", cell)}

        out[names(name).pop()] = (names(knows), names(lazily), pyro.startswith("yes"))
    return out


# ------------------------------------------------------------------------------ the tests
def test_the_table_in_the_docs_is_the_table_of_this_test():
    table = doc_table()
    assert list(table) == list(LAYERS), "rows differ (or their order)"
    for name, layer in LAYERS.items():
        assert table[name] == (set(layer.knows), set(layer.lazily), layer.pyro), name


def test_every_import_keeps_to_the_layers():
    files, imports = all_imports()
    assert len(files) > 50 and len(imports) > 300  # the reader found the package
    assert layer_violations(files, imports) == []


def test_no_import_cycles_between_modules():
    files, imports = all_imports()
    assert import_cycles(files, imports) == []


def test_nothing_imports_the_cli():
    files, imports = all_imports()
    importers = {i.source for i in imports if i.target == f"{PACKAGE}.cli"}
    assert importers <= {f"{PACKAGE}.__main__"}


def test_importing_em_does_not_load_pyro():
    code = ("import sys, pyro_seqlatent.em, pyro_seqlatent.em.distributed; "
            "print(sorted(m for m in sys.modules if m == 'pyro' or m.startswith('pyro.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------ the checker itself
def _package(tmp_path: Path, sources: dict[str, str]) -> Path:
    for rel, text in sources.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / PACKAGE


BASE = {"__init__.py": "", "em/__init__.py": "", "infer/__init__.py": "",
        "models/__init__.py": "", "registry.py": "", "parallel.py": "", "cli.py": ""}


@pytest.mark.parametrize("rel, text, message", [
    ("em/gmm.py", "from pyro_seqlatent.infer import train\n", "em imports pyro_seqlatent.infer"),
    ("em/gmm.py", "def f():\n    import pyro\n", "em imports Pyro"),
    ("em/gmm.py", "from ..infer import train\n", "em imports pyro_seqlatent.infer"),
    ("infer/run.py", "from pyro_seqlatent.models import vae\n", "infer imports pyro_seqlatent"),
    ("models/vae.py", "from pyro_seqlatent.infer import train\n", "at module level"),
    ("registry.py", "import pyro_seqlatent.models\n", "at module level"),
    ("models/vae.py", "import importlib\nimportlib.import_module('pyro_seqlatent.cli')\n",
     "models imports pyro_seqlatent.cli"),
])
def test_the_checker_catches_a_forbidden_import(tmp_path, rel, text, message):
    source = _package(tmp_path, {**BASE, rel: text})
    files, imports = all_imports(source)
    assert any(message in p for p in layer_violations(files, imports))


def test_the_checker_allows_what_the_table_allows(tmp_path):
    source = _package(tmp_path, {**BASE, "em/gmm.py": "from . import kmeans\n",
                                 "em/kmeans.py": "from pyro_seqlatent.parallel import world\n",
                                 "models/vae.py": "def f():\n    from ..infer import train\n",
                                 "registry.py": "def f():\n    import pyro_seqlatent.models\n"})
    files, imports = all_imports(source)
    assert layer_violations(files, imports) == []
    assert Import("pyro_seqlatent.em.gmm", "pyro_seqlatent.em.kmeans", 1, False) in imports


def test_the_checker_finds_lazy_cycles(tmp_path):
    source = _package(tmp_path, {**BASE,
                                 "cli.py": "def main():\n    from pyro_seqlatent import registry\n",
                                 "registry.py": "def f():\n    import pyro_seqlatent.cli\n"})
    files, imports = all_imports(source)
    assert import_cycles(files, imports) == [["pyro_seqlatent.cli", "pyro_seqlatent.registry"]]
