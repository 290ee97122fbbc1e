"""The coordinator package's shape: imports at module top, no import cycle, no module over 400
lines, no import of the agent role, one string per state (issue 14 items 4, 5 and 7)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "coordinator"
OURS = ("protocol", "learning", "coordinator", "edge_agent", "export", "fedscan", "bench")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""]


def test_no_function_local_imports_of_our_own_modules() -> None:
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in _imported(node)
                              if name.split(".")[0] in OURS]
    assert found == []


def test_the_coordinator_never_imports_the_agent_role() -> None:
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found += [f"{path.relative_to(ROOT)}: {n}" for n in _imported(node) if n.split(".")[0] == "edge_agent"]
    assert found == []


def test_every_module_imports_first_without_a_cycle() -> None:
    """Each module imported first, in a process where no module of ours is loaded yet: an import
    cycle fails for at least one entry point."""
    names = [_module_name(p) for p in _modules()]
    code = (
        "import importlib, sys\n"
        f"ours = {OURS!r}\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ours]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        failed.append(f'{name}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_under_400_lines(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) < 400
