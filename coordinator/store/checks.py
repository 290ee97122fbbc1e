"""Argument checks shared by the store's repositories: pure functions raising ValueError.

They refuse what would not round-trip identically on SQLite and PostgreSQL (NaN, non-string
JSON keys), identifiers that are empty or too long, and numbers outside the columns' range,
before any transaction starts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Final

SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
#: Largest value of an ``INTEGER`` column on PostgreSQL (SQLite's is wider): counts above it are refused.
INT32_MAX: Final = 2**31 - 1


def check_json(value: object, field: str) -> None:
    """Refuse values that would not round-trip identically on both backends."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} is not JSON-serialisable (no NaN/inf, str keys): {exc}") from exc
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{field}: JSON object keys must be str, got {key!r}")


def check_id(value: object, field: str, max_len: int = 255) -> str:
    """A non-empty string of at most ``max_len`` characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty str, got {value!r}")
    if len(value) > max_len:
        raise ValueError(f"{field} longer than {max_len} characters")
    return value


def check_nonneg(value: object, field: str, maximum: int | None = None) -> int:
    """A non-negative int (not a bool), at most ``maximum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} must be a non-negative int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field} must be at most {maximum}, got {value}")
    return value


def check_float(value: object, field: str) -> float:
    """A finite number (not a bool), as float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def check_sha256(value: object, field: str) -> str:
    """A lowercase 64-character hex digest."""
    if not (isinstance(value, str) and SHA256_RE.fullmatch(value)):
        raise ValueError(f"{field} must be a lowercase 64-character hex digest, got {value!r}")
    return value


def check_str_list(value: object, field: str) -> list[str]:
    """A list of str (a bare str is refused), copied."""
    if isinstance(value, str) or not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field} must be a list of str")
    return list(value)
