"""Issue 14 item 6: each shared concept is defined once in the product tree (ast scan)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "firmware", "learning", "coordinator", "edge_agent", "export", "fedscan", "bench")
ONCE = {
    "Tensors": "protocol/codec/tensors.py",
    "InferenceEngine": "export/engines.py",
    "softmax": "learning/calibration.py",
    "Identifier": "protocol/identifiers.py",
    "validate_id": "protocol/identifiers.py",
    "PreprocessStep": "protocol/preprocessing.py",
    "TrainingConfig": "protocol/messages.py",
}


def _definitions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef | ast.FunctionDef):
                    found[node.name].append(rel)
                elif isinstance(node, ast.Assign):
                    found.update({t.id: [*found[t.id], rel] for t in node.targets if isinstance(t, ast.Name)})
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                    found[node.target.id].append(rel)
    return found


def test_each_shared_concept_has_one_definition() -> None:
    defs = _definitions()
    assert {name: defs.get(name) for name in ONCE} == {name: [where] for name, where in ONCE.items()}


def test_the_identifier_pattern_is_written_once() -> None:
    """The character class of an identifier appears in one module only (others import it)."""
    hits = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "[A-Za-z0-9_.-]{1,64}" in p.read_text()]
    assert hits == ["protocol/identifiers.py"]
