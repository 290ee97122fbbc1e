"""The box's resource sampler, and its readings turned into the wire telemetry message.

CPU, memory, disk, temperatures (psutil) and GPUs (NVML), plus the agent's own numeric sections,
become a :class:`~protocol.messages.Telemetry` message.

The module never logs sample contents, only why a source is unavailable.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import psutil

from edge_agent.telemetry.nvml import NvmlProbe
from edge_agent.telemetry.samples import (
    KEY_PATTERN,
    InferenceProvider,
    ResourceSample,
    TrainingProvider,
    VersionProvider,
    clean_section,
    finite,
)
from protocol.identifiers import is_identifier
from protocol.messages import Telemetry

log = logging.getLogger("edge_agent.telemetry")


class TelemetrySampler:
    """Reads the box's resources. Cheap: one call reads /proc and sysfs a few times, plus NVML.

    CPU percent is computed from our own ``cpu_times`` deltas between two calls (the average over
    the publishing period), so other callers of ``psutil.cpu_percent`` cannot disturb it.
    """

    def __init__(
        self,
        *,
        disk_path: str = "/",
        gpu: bool = True,
        temperatures: bool = True,
        inference: InferenceProvider | None = None,
        training: TrainingProvider | None = None,
        model_version: VersionProvider | None = None,
        nvml: NvmlProbe | None = None,
    ) -> None:
        """Read ``disk_path``'s disk, the GPUs (``gpu``) and temperatures, plus the providers' sections."""
        self.disk_path = disk_path
        self.inference = inference
        self.training = training
        self.model_version = model_version
        self.nvml = (nvml or NvmlProbe()) if gpu else None
        self._temperatures = temperatures and hasattr(psutil, "sensors_temperatures")
        self._last_cpu = psutil.cpu_times()
        self._process = psutil.Process()
        self._last_own = (time.monotonic(), self._own_cpu_seconds())
        self._ncpu = psutil.cpu_count() or 1
        self._warned: set[str] = set()

    def _once(self, what: str, msg: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.info(msg, *args)

    def _cpu_percent(self) -> float | None:
        now = psutil.cpu_times()
        last, self._last_cpu = self._last_cpu, now
        idle = float(now.idle + getattr(now, "iowait", 0.0)) - float(last.idle + getattr(last, "iowait", 0.0))
        total = float(sum(now) - sum(last))
        if total <= 0:
            return None
        return max(0.0, min(100.0, 100.0 * (total - idle) / total))

    def _own_cpu_seconds(self) -> float:
        t = self._process.cpu_times()
        return float(t.user + t.system)

    def _own_cpu_percent(self) -> float | None:
        now = (time.monotonic(), self._own_cpu_seconds())
        (t0, c0), self._last_own = self._last_own, now
        wall = now[0] - t0
        if wall <= 0:
            return None
        return max(0.0, min(100.0, 100.0 * (now[1] - c0) / (wall * self._ncpu)))

    def _temps(self) -> dict[str, float]:
        if not self._temperatures:
            return {}
        try:
            chips = psutil.sensors_temperatures()
        except (OSError, RuntimeError) as exc:
            self._once("temps", "telemetry: temperatures unavailable: %s", exc.__class__.__name__)
            return {}
        out: dict[str, float] = {}
        for chip, readings in chips.items():
            values = [r.current for r in readings if finite(r.current) is not None]
            key = re.sub(r"[^a-z0-9_]", "_", chip.lower())[:32]
            if values and KEY_PATTERN.match(key):
                out[key] = max(values)
        if not out:
            self._once("temps", "telemetry: the OS exposes no temperature sensors")
        return out

    def sample(self) -> ResourceSample:
        """Read the box's resources now."""
        at = time.time()
        vm = psutil.virtual_memory()
        try:
            disk: float | None = psutil.disk_usage(self.disk_path).percent
        except OSError as exc:
            self._once("disk", "telemetry: disk usage of the data path unavailable: %s", exc.__class__.__name__)
            disk = None
        return ResourceSample(
            at=at,
            cpu_percent=self._cpu_percent(),
            own_cpu_percent=self._own_cpu_percent(),
            memory_percent=vm.percent,
            memory_available_mb=vm.available / 2**20,
            disk_percent=disk,
            temperatures_c=self._temps(),
            gpus=self.nvml.sample() if self.nvml is not None else (),
        )

    def _provided(self, name: str, fn: Callable[[], Any] | None) -> Any:
        if fn is None:
            return None
        try:
            return fn()
        except Exception as exc:  # a broken provider must not stop telemetry; never log its data
            self._once(f"provider-{name}", "telemetry: %s provider failed: %s", name, exc.__class__.__name__)
            return None

    def to_message(self, sample: ResourceSample) -> Telemetry:
        """Build the wire message of ``sample`` plus the providers' sections (cleaned)."""
        version = self._provided("model_version", self.model_version)
        return Telemetry(
            at=sample.at,
            cpu_percent=sample.cpu_percent,
            memory_percent=sample.memory_percent,
            disk_percent=sample.disk_percent,
            temperatures_c=sample.temperatures_c,
            gpu=[g.to_wire() for g in sample.gpus],
            inference=clean_section(self._provided("inference", self.inference), allow_state=False),
            training=clean_section(self._provided("training", self.training), allow_state=True),
            model_version=version if is_identifier(version) else None,
        )

    def close(self) -> None:
        """Release NVML."""
        if self.nvml is not None:
            self.nvml.close()
