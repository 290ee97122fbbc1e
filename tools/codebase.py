"""Read the shape of our own packages from their source (``ast``, nothing is imported).

One scan gives, per module of our packages: its dotted name, line count, the imports of our own
modules it makes and where (module level, function-local, under ``if TYPE_CHECKING:``), how
often it names ``Any``, and the exception classes it defines. The architecture test
(``tests/test_architecture.py``) checks the import rules on it; ``tools/layout_stats.py`` prints
the before/after table from it.

Our packages are the top-level folders of the repository root that hold an ``__init__.py``
(``protocol``, ``learning``, ``coordinator``, ``edge_agent``, ``export``, ``fedscan``, and any
new one); ``tests``, ``bench``, ``tools`` and ``deploy`` are not packages of the product.
"""

from __future__ import annotations

import ast
import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NOT_PRODUCT = frozenset({"tests", "bench", "tools", "deploy", "docs", "build"})
"""Top-level folders that are never product packages, even with an ``__init__.py``."""

EXCEPTION_BASES = frozenset({"Exception", "BaseException", "ValueError", "RuntimeError", "TypeError",
                             "KeyError", "LookupError", "OSError", "IOError", "PermissionError",
                             "FileNotFoundError", "TimeoutError", "ConnectionError", "ArithmeticError",
                             "AssertionError", "NotImplementedError", "IndexError", "HTTPException"})
"""Builtin (and FastAPI) exception names: a class deriving from one of these, or from a class of
the same module that does, is counted as an error class."""


class Where(enum.StrEnum):
    """Where an import statement sits in its module."""

    MODULE = "module"
    """At module level (also inside a module-level ``try``/``if``): runs on import."""
    TYPE_CHECKING = "type_checking"
    """Under ``if TYPE_CHECKING:``: seen by type checkers only, never run."""
    FUNCTION = "function"
    """Inside a function or method body: runs when that code runs."""


@dataclass(frozen=True)
class Import:
    """One import of one of our modules by another."""

    source: str
    """Dotted name of the importing module."""
    target: str
    """Dotted name of the imported module (a submodule when ``from pkg import submodule``)."""
    where: Where
    lineno: int


@dataclass
class Module:
    """What the scan found in one ``.py`` file of our packages."""

    name: str
    path: Path
    lines: int
    imports: list[Import] = field(default_factory=list)
    any_count: int = 0
    error_classes: list[str] = field(default_factory=list)

    @property
    def package(self) -> str:
        """The top-level package the module belongs to."""
        return self.name.split(".", 1)[0]


def product_packages(root: Path) -> list[str]:
    """Return the top-level packages of the repository at ``root``, sorted."""
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file() and p.name not in NOT_PRODUCT
                  and not p.name.startswith("."))


def module_name(root: Path, path: Path) -> str:
    """Return the dotted module name of ``path`` (``pkg/__init__.py`` is ``pkg``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, where: Where) -> Iterator[tuple[ast.Import | ast.ImportFrom, Where]]:
    """Yield every import statement below ``node`` with where it sits."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, where
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, Where.FUNCTION)
        elif isinstance(child, ast.If) and where is Where.MODULE and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), Where.TYPE_CHECKING)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), Where.MODULE)
        else:
            yield from _walk(child, where)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Return the absolute module a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, node.module] if node.module else base)


def _targets(stmt: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             known: frozenset[str]) -> list[str]:
    """Return the modules of ours one import statement loads (submodules where named)."""
    if isinstance(stmt, ast.Import):
        return [a.name for a in stmt.names]
    base = _resolve_from(module, is_package, stmt)
    out: list[str] = []
    for alias in stmt.names:
        sub = f"{base}.{alias.name}"
        target = sub if sub in known else base
        if target not in out:
            out.append(target)
    return out


def _error_classes(tree: ast.Module) -> list[str]:
    """Return the names of the exception classes a module defines (also via its own classes)."""
    errors: set[str] = set()
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for c in classes:
            if c.name in errors:
                continue
            for b in c.bases:
                name = b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                if name in EXCEPTION_BASES or name in errors or name.endswith(("Error", "Exception")):
                    errors.add(c.name)
                    changed = True
                    break
    return sorted(errors)


def _any_count(tree: ast.Module) -> int:
    """Count the places a module names ``Any`` (``Any`` or ``typing.Any``) in code or annotations."""
    n = 0
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == "Any") or (
                isinstance(node, ast.Attribute) and node.attr == "Any"):
            n += 1
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            n += _string_annotation_any(node.value)
    return n


def _string_annotation_any(text: str) -> int:
    """Count ``Any`` in a string that parses as an expression (a quoted annotation), else 0."""
    if "Any" not in text or len(text) > 200:
        return 0
    try:
        expr = ast.parse(text, mode="eval")
    except SyntaxError:
        return 0
    return sum(1 for n in ast.walk(expr) if isinstance(n, ast.Name) and n.id == "Any")


def scan(root: Path, packages: Iterable[str] | None = None) -> dict[str, Module]:
    """Scan the packages (default: :func:`product_packages`) under ``root``; return modules by name."""
    pkgs = list(packages) if packages is not None else product_packages(root)
    files = sorted(f for p in pkgs for f in (root / p).rglob("*.py") if "__pycache__" not in f.parts)
    known = frozenset(module_name(root, f) for f in files)
    mods: dict[str, Module] = {}
    for f in files:
        name = module_name(root, f)
        text = f.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(f))
        mod = Module(name, f, len(text.splitlines()), any_count=_any_count(tree), error_classes=_error_classes(tree))
        for stmt, where in _walk(tree, Where.MODULE):
            for target in _targets(stmt, name, f.name == "__init__.py", known):
                if target.split(".", 1)[0] in pkgs:
                    mod.imports.append(Import(name, target, where, stmt.lineno))
        mods[name] = mod
    return mods


def module_graph(mods: Mapping[str, Module]) -> dict[str, set[str]]:
    """Return the runtime import graph at module level (``TYPE_CHECKING`` and function bodies left out)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods.values():
        for imp in m.imports:
            if imp.where is Where.MODULE and imp.target in mods and imp.target != m.name:
                graph[m.name].add(imp.target)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)
