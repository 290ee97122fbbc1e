"""``docs/security.md`` names the test that shows each mitigation (issue 15): every name it cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "security.md"
ATTACKERS = ("An enrolled box", "A network attacker", "A stolen box", "Compromised coordinator credentials")


def defined_tests(folder: Path) -> set[str]:
    """Names of the test functions defined at the top of the ``test_*.py`` modules in ``folder``."""
    names = set()
    for path in folder.glob("test_*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


def cited_tests(text: str) -> set[str]:
    """The ``test_…`` names a document cites in backticks."""
    return set(re.findall(r"`(test_[a-z0-9_]+)`", text))


def test_every_cited_test_exists_and_every_attacker_is_covered() -> None:
    text = DOC.read_text(encoding="utf-8")
    cited = cited_tests(text)
    assert len(cited) >= 60, len(cited)
    assert sorted(cited - defined_tests(ROOT / "tests")) == []
    for attacker in ATTACKERS:
        assert f"### {ATTACKERS.index(attacker) + 1}. {attacker}" in text, attacker
    assert "## Out of scope" in text and "## Assets" in text


def test_the_check_catches_a_missing_name(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text("def test_here():\n    pass\nclass T:\n    def test_method(self): ...\n")
    cited = cited_tests("`test_here` and `test_gone` and `test_method`")
    assert sorted(cited - defined_tests(tmp_path)) == ["test_gone", "test_method"]
