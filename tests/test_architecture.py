"""The package layout rules (issue 14, "Must show"; the architecture notes), read from source with ``ast``.

- the two roles never import each other: no ``edge_agent`` → ``coordinator`` and no
  ``coordinator`` → ``edge_agent`` import, wherever it sits (module level, function body,
  ``if TYPE_CHECKING:``);
- ``protocol/`` imports nothing else of ours; ``learning/`` no role (``coordinator``,
  ``edge_agent``, ``fedscan``) and not ``export``; ``export/`` no role;
- the composition root ``fedscan/`` is imported by none of the packages (it alone wires concrete
  classes of both roles together, e.g. the edge's metrics router into the coordinator's app);
- no import cycle among our modules at module level;
- no module over 400 lines, and no function-local import of our own modules except those that
  pull a heavy dependency (``ALLOWED_LAZY``: opacus for DP agents only; MONAI and opacus for the
  segmentation job only; torch, which the CLI's commands without training or serving never need).

Each rule is also run on a small planted tree, so a scanner that finds nothing cannot pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ is not an installed package; plain `pytest` puts only tests/ on the path
from tools import layout_stats  # noqa: E402
from tools.codebase import Module, Where, cycles, module_graph, scan  # noqa: E402

ROLES = ("coordinator", "edge_agent", "fedscan")
MAX_LINES = 400

FORBIDDEN: dict[str, frozenset[str]] = {
    "edge_agent": frozenset({"coordinator", "fedscan"}),
    "coordinator": frozenset({"edge_agent", "fedscan"}),
    "learning": frozenset({*ROLES, "export"}),
    "export": frozenset(ROLES),
}
"""Packages each package must not import (``protocol`` is handled apart: it imports nothing of
ours; every other package must not import the composition root ``fedscan``)."""

ALLOWED_LAZY: dict[str, str] = {
    "learning.dp": "opacus",
    "learning.segmentation.model": "monai",
    "fedscan.segment_job": "monai",  # fedscan.jobs: the segmentation job, imported by processes that run it
    "edge_agent.segment_training": "opacus",
    "fedscan.compose": "torch",
    "fedscan.demo": "torch",
    "fedscan.melanoma_demo": "torch",  # demo --task melanoma
    "fedscan.partition_run": "torch",  # fedscan partition
    "learning.data_source": "torch",  # the CLI's --data check, only where --data is given
}
"""Modules of ours that may be imported inside a function, with the heavy dependency that makes
them worth deferring (that module, or one it imports at module level, must import it at its top)."""


def layer_violations(mods: dict[str, Module]) -> list[str]:
    """Return one line per import that breaks the package rules."""
    out = []
    for m in mods.values():
        for imp in m.imports:
            src, dst = m.package, imp.target.split(".", 1)[0]
            if src == dst:
                continue
            forbidden = FORBIDDEN.get(src, frozenset({"fedscan"}))
            if src == "protocol" or dst in forbidden:
                out.append(f"{m.name}:{imp.lineno} -> {imp.target} ({imp.where})")
    return out


def lazy_violations(mods: dict[str, Module]) -> list[str]:
    """Return one line per function-local import of our own modules outside ``ALLOWED_LAZY``."""
    return [f"{imp.source}:{imp.lineno} -> {imp.target}" for m in mods.values() for imp in m.imports
            if imp.where is Where.FUNCTION and imp.target not in ALLOWED_LAZY]


def long_modules(mods: dict[str, Module]) -> list[str]:
    """Return the modules over ``MAX_LINES`` lines, with their length."""
    return [f"{m.name} {m.lines}" for m in mods.values() if m.lines > MAX_LINES]


@pytest.fixture(scope="module")
def mods() -> dict[str, Module]:
    """The scan of the repository's own packages."""
    return scan(ROOT)


def test_the_scan_covers_every_package(mods: dict[str, Module]) -> None:
    found = {m.package for m in mods.values()}
    assert {"protocol", "learning", "coordinator", "edge_agent", "export", "fedscan"} <= found
    assert len(mods) > 50
    assert not any(p in found for p in ("tests", "bench", "tools"))


def test_package_layering(mods: dict[str, Module]) -> None:
    assert layer_violations(mods) == []


def test_no_import_cycle_at_module_level(mods: dict[str, Module]) -> None:
    assert cycles(module_graph(mods)) == []


def pulls(mods: dict[str, Module], name: str, dep: str) -> bool:
    """Whether importing ``name`` imports ``dep``: it, or a module it imports at module level
    (transitively), imports ``dep`` at its top."""
    graph, seen, todo = module_graph(mods), set(), [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        text = mods[m].path.read_text(encoding="utf-8")
        if f"\nfrom {dep}" in text or f"\nimport {dep}" in text:
            return True
        todo += graph[m]
    return False


def test_allowed_lazy_modules_really_pull_their_heavy_dependency(mods: dict[str, Module]) -> None:
    """An allow-list entry whose heavy dependency is gone is a stale excuse for a hidden import."""
    for name, dep in ALLOWED_LAZY.items():
        assert pulls(mods, name, dep), f"{name} no longer imports {dep}"
    assert not pulls(mods, "protocol.frame", "torch")  # the check can say no


def test_no_module_over_400_lines(mods: dict[str, Module]) -> None:
    assert long_modules(mods) == []


def test_no_function_local_import_of_our_modules(mods: dict[str, Module]) -> None:
    assert lazy_violations(mods) == []


# -- the checks themselves, on a planted tree ----------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in {rel.split("/", 1)[0] for rel in files}:
        (root / pkg / "__init__.py").touch()
    (root / "tests").mkdir(exist_ok=True)
    (root / "tests" / "__init__.py").write_text("import coordinator.a\n")  # never a product package
    return scan(root)


def test_checks_catch_planted_violations(tmp_path: Path) -> None:
    mods = _tree(tmp_path, {
        "edge_agent/a.py": "def f():\n    from coordinator import b\n",
        "coordinator/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edge_agent.a import f\n",
        "protocol/p.py": "from learning import m\n",
        "learning/m.py": "from . import n\nx = 1\n",
        "learning/n.py": "from .m import x\n",
        "export/e.py": "import fedscan.compose\n",
        "fedscan/compose.py": "from edge_agent import a\nfrom coordinator import b\n" + "\n" * MAX_LINES,
    })
    assert {m.package for m in mods.values()} == {"edge_agent", "coordinator", "protocol", "learning", "export",
                                                  "fedscan"}
    bad = layer_violations(mods)
    assert len(bad) == 4, bad  # edge->coord (function), coord->edge (TYPE_CHECKING), protocol->learning, export->fedscan
    assert any("(function)" in b for b in bad) and any("(type_checking)" in b for b in bad)
    assert cycles(module_graph(mods)) == [["learning.m", "learning.n"]]
    assert lazy_violations(mods) == ["edge_agent.a:2 -> coordinator.b"]
    assert long_modules(mods) == [f"fedscan.compose {MAX_LINES + 2}"]


def test_type_checking_and_function_imports_make_no_cycle(tmp_path: Path) -> None:
    mods = _tree(tmp_path, {
        "learning/m.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from learning import n\n",
        "learning/n.py": "import learning.m\ndef f():\n    import learning.n\n",
    })
    assert cycles(module_graph(mods)) == []
    assert layer_violations(mods) == []


def test_layout_stats_counts_a_planted_tree(tmp_path: Path) -> None:
    mods = _tree(tmp_path, {
        "protocol/errors.py": "from typing import Any\nclass Bad(ValueError):\n    x: Any\nclass Worse(Bad):\n"
                              "    y: 'dict[str, Any]'\nclass Plain:\n    pass\n",
        "learning/m.py": "def f():\n    import protocol.errors\n    from protocol import errors\n",
    })
    table = {r.package: r for r in layout_stats.rows(mods, ["protocol", "learning"])}
    assert (table["protocol"].files, table["protocol"].lines, table["protocol"].largest_lines) == (2, 7, 7)
    assert table["protocol"].largest_module == "protocol.errors"
    assert (table["protocol"].any_count, table["protocol"].error_classes) == (2, 2)  # uses, not the import
    assert table["learning"].function_local_imports == 2
    assert table["total"].files == 4 and table["total"].function_local_imports == 2
    assert "| protocol | 2 | 7 | protocol.errors (7) | 0 | 2 | 2 |" in layout_stats.markdown(list(table.values()))
