"""What one telemetry sample holds, and the filter every provider value passes before the wire.

A provider section (inference counters, training progress) keeps only short snake_case keys with
finite numbers; the only string allowed is the training ``state`` from :data:`TRAINING_STATES`.
So nothing a provider might accidentally return (a file name, a study UID, a patient name) can
reach the wire.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import TrainingState

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: The only string values a training section may carry (key ``state``).
TRAINING_STATES = frozenset(s.value for s in TrainingState)

InferenceProvider = Callable[[], Mapping[str, float]]
TrainingProvider = Callable[[], Mapping[str, float | str]]
VersionProvider = Callable[[], str | None]


@dataclass(frozen=True)
class GpuSample:
    """One GPU's reading; ``None`` where NVML cannot tell."""

    index: int
    util_percent: float | None = None
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    name: str | None = None
    #: compute processes on this GPU other than this agent process (None: NVML cannot tell)
    other_processes: int | None = None

    @property
    def mem_percent(self) -> float | None:
        """Memory used, percent of total."""
        if self.mem_used_mb is None or not self.mem_total_mb:
            return None
        return 100.0 * self.mem_used_mb / self.mem_total_mb

    def to_wire(self) -> dict[str, float | str | None]:
        """Return the fields the wire message carries, ``None`` left out."""
        d: dict[str, float | str | None] = {
            "index": self.index,
            "util_percent": self.util_percent,
            "mem_percent": self.mem_percent,
            "mem_used_mb": self.mem_used_mb,
            "temp_c": self.temp_c,
            "power_w": self.power_w,
        }
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class ResourceSample:
    """One reading of the box's resources; richer than the wire message (``memory_available_mb``)."""

    at: float
    cpu_percent: float | None = None
    #: CPU used by this agent process (training, serving), on the same whole-box scale as ``cpu_percent``
    own_cpu_percent: float | None = None
    memory_percent: float | None = None
    memory_available_mb: float | None = None
    disk_percent: float | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    gpus: tuple[GpuSample, ...] = ()


def finite(x: Any) -> float | None:
    """Return ``x`` as a float when it is a finite real number (not a bool), else ``None``."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def clean_section(section: Mapping[str, Any] | None, *, allow_state: bool) -> dict[str, Any]:
    """Keep only ``snake_case`` keys with finite numbers (and a known training ``state``)."""
    out: dict[str, Any] = {}
    if not section:
        return out
    for key, value in section.items():
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            continue
        if allow_state and key == "state":
            if isinstance(value, str) and value in TRAINING_STATES:
                out[key] = value
            continue
        num = finite(value)
        if num is not None:
            out[key] = num
    return out
