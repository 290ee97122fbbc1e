"""What an anomaly site keeps to itself between rounds and for serving, as one ``.npz`` file.

Under FedDis the coordinator never sees the appearance branch and the merger (``local``
tensors), nor the site's thresholds; the box keeps them here and serves the global shape branch
with them. :func:`save_site_state` / :func:`load_site_state` round-trip the tensors bit-exactly
and the thresholds as numbers; a file that is not such a state, or that lacks a field, is refused
with ``AnomalyError`` (``bad_frame``).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learning.anomaly.errors import AnomalyError
from learning.anomaly.scoring import SiteThresholds
from protocol.errors import Reason

_META = "__anomaly_site_state__"
FORMAT = 1


@dataclass(frozen=True)
class SiteState:
    """What a site keeps to itself.

    Its local tensors (name → array), its thresholds (None before calibration), and the global
    model version its local tensors were last trained with.
    """

    local: dict[str, np.ndarray]
    thresholds: SiteThresholds | None
    base_version: str


def save_site_state(path: Path, state: SiteState) -> None:
    """Write ``state`` to ``path`` (atomically: a temporary file renamed into place)."""
    if _META in state.local:
        raise AnomalyError(f"tensor name {_META!r} is reserved")
    meta = {"format": FORMAT, "base_version": state.base_version,
            "thresholds": asdict(state.thresholds) if state.thresholds else None}
    buf = io.BytesIO()
    payload: dict[str, Any] = {_META: np.frombuffer(json.dumps(meta).encode(), np.uint8), **state.local}
    np.savez(buf, **payload)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load_site_state(path: Path) -> SiteState:
    """Read a state written by :func:`save_site_state`; anything else is refused (``bad_frame``)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(_META).tobytes().decode())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        thr = meta["thresholds"]
        return SiteState(arrays, SiteThresholds(**thr) if thr is not None else None, str(meta["base_version"]))
    except (OSError, EOFError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise AnomalyError(f"{path}: not an anomaly site state ({type(exc).__name__}: {exc})",
                           reason=Reason.BAD_FRAME) from exc
