"""Locate the shared real data (``../shared/data`` beside the project root), loudly."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """``$FEDSCAN_DATA`` if set, else ``<project>/../shared/data``."""
    env = os.environ.get("FEDSCAN_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def find_data_file(name: str = "pneumoniamnist.npz") -> Path | None:
    """Path of a shared data file, or None (callers then fall back to generated data and must say so)."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p if p.exists() else None
    candidate = data_dir() / name
    return candidate if candidate.exists() else None


def warn_generated(what: str) -> None:
    """The one loud message for running on generated instead of real data."""
    msg = (
        f"!!! REAL DATA NOT FOUND ({data_dir()}): {what} runs on GENERATED images. "
        "Figures from this run say nothing about medical performance. Set FEDSCAN_DATA."
    )
    log.warning(msg)
    print(msg, flush=True)
