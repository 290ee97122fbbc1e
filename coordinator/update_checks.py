"""What an accepted update must be for the store to hold it: checks on a decoded frame header.

They run after the frame decodes and before anything is written, so a malformed update is
answered ``rejected`` with a reason and leaves no blob behind; the store's own checks would
otherwise refuse the row only after the frame was on disk, with nothing answered, and the agent
would resend until the deadline. Pure functions; every refusal is a ``FrameError`` with a reason.
"""

from __future__ import annotations

import json
import math
from typing import Final

from coordinator.store.checks import INT32_MAX
from protocol.errors import FrameError, Reason
from protocol.frame import FrameHeader

#: At most this many metrics per update, each name at most this long, all of them as JSON at
#: most this many bytes: an update's metrics are a handful of numbers (loss, accuracy, ε, ...).
MAX_METRICS: Final = 64
MAX_METRIC_NAME: Final = 64
MAX_METRICS_JSON: Final = 8 * 1024


def check_storable(header: FrameHeader) -> None:
    """FrameError unless the store can keep this update exactly as the agent sent it."""
    if header.sample_count > INT32_MAX:
        raise FrameError(f"sample_count {header.sample_count} is above {INT32_MAX}", reason=Reason.BAD_HEADER)
    metrics = header.metrics
    if len(metrics) > MAX_METRICS or any(len(name) > MAX_METRIC_NAME for name in metrics):
        raise FrameError(f"{len(metrics)} metrics (at most {MAX_METRICS}, names of at most {MAX_METRIC_NAME} "
                         "characters)", reason=Reason.TOO_LARGE)
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        raise FrameError(f"metrics {bad[:5]} are not finite numbers", reason=Reason.NON_FINITE)
    size = len(json.dumps(metrics, allow_nan=False).encode("utf-8"))
    if size > MAX_METRICS_JSON:
        raise FrameError(f"metrics take {size} bytes as JSON (at most {MAX_METRICS_JSON})", reason=Reason.TOO_LARGE)
