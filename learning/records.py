"""Dotted field access into nested metadata records (per-image JSON such as the ISIC archive's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.errors import FedscanError, Reason


class MissingField(FedscanError, KeyError):
    """A dotted field that is absent (or null) in a record; ``field`` names it."""

    reason = Reason.BAD_DATASET

    def __init__(self, field: str) -> None:
        """Name the missing ``field``."""
        super().__init__(f"field {field!r} is missing or null")
        self.field = field


def dotted_get(record: Mapping[str, Any], field: str) -> Any:
    """Return the value at ``field`` (``"a.b.c"``) in nested mappings; :class:`MissingField` when absent or null."""
    node: Any = record
    for part in field.split("."):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            raise MissingField(field)
        node = node[part]
    return node
