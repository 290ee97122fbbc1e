"""Print the layout table of issue 14's closing note for one checkout of the repository.

Per product package (``protocol learning coordinator edge_agent export fedscan`` and any new
top-level package) and in total: files, lines, the largest module, function-local import
statements of our own modules, how often ``Any`` is named, and the error classes defined.

Usage (from the repository root)::

    python tools/layout_stats.py                 # this checkout
    python tools/layout_stats.py --root /tmp/x   # another one, e.g. ``git worktree add /tmp/x 64f46d3``
    python tools/layout_stats.py --json          # the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.codebase import Module, Where, product_packages, scan

ORDER = ("protocol", "learning", "coordinator", "edge_agent", "export", "fedscan")


@dataclass(frozen=True)
class Row:
    """The figures of one package (or of all of them: ``package == "total"``)."""

    package: str
    files: int
    lines: int
    largest_module: str
    largest_lines: int
    function_local_imports: int
    any_count: int
    error_classes: int


def row(name: str, mods: Sequence[Module]) -> Row:
    """Return the figures of ``mods`` under the label ``name``."""
    largest = max(mods, key=lambda m: m.lines)
    local = {(i.source, i.lineno) for m in mods for i in m.imports if i.where is Where.FUNCTION}
    return Row(name, len(mods), sum(m.lines for m in mods), largest.name, largest.lines, len(local),
               sum(m.any_count for m in mods), sum(len(m.error_classes) for m in mods))


def rows(mods: Mapping[str, Module], packages: Sequence[str]) -> list[Row]:
    """Return one row per package that has modules, then the total."""
    out = [row(p, [m for m in mods.values() if m.package == p]) for p in packages
           if any(m.package == p for m in mods.values())]
    out.append(row("total", list(mods.values())))
    return out


def markdown(table: Sequence[Row]) -> str:
    """Return the rows as a Markdown table."""
    head = "| package | files | lines | largest module (lines) | function-local imports | `Any` | error classes |"
    lines = [head, "|---|---:|---:|---|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r.package} | {r.files} | {r.lines} | {r.largest_module} ({r.largest_lines}) | "
                     f"{r.function_local_imports} | {r.any_count} | {r.error_classes} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table for ``--root`` (default: this checkout)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    found = product_packages(args.root)
    packages = [p for p in ORDER if p in found] + [p for p in found if p not in ORDER]
    table = rows(scan(args.root, packages), packages)
    print(json.dumps([asdict(r) for r in table], indent=1) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
