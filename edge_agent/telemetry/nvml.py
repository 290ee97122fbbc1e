"""Per-GPU readings through NVML (``pynvml`` from nvidia-ml-py), imported and initialised lazily.

Without a driver or GPU the probe has no handles, ``reason`` says why, and the reason is logged
once at INFO; a field a GPU does not support (power on some boards) reads as ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from edge_agent.telemetry.samples import GpuSample

log = logging.getLogger("edge_agent.telemetry")


class NvmlProbe:
    """Per-GPU readings through NVML, imported and initialised lazily; ``reason`` when unavailable."""

    def __init__(self) -> None:
        """Prepare the probe; NVML is loaded on first use."""
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._started = False
        self._pid = os.getpid()
        self.reason: str | None = None

    @property
    def available(self) -> bool:
        """Whether at least one GPU can be read."""
        self._start()
        return bool(self._handles)

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            import pynvml
        except ImportError as exc:  # nvidia-ml-py is a dependency, but keep the agent alive without it
            self.reason = f"pynvml not importable ({exc.__class__.__name__})"
        else:
            try:
                pynvml.nvmlInit()
                count = pynvml.nvmlDeviceGetCount()
                handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            except pynvml.NVMLError as exc:
                self.reason = f"NVML unavailable: {exc}"
            else:
                self._nvml = pynvml
                self._handles = handles
                self._names = [_nvml_str(self._try(pynvml.nvmlDeviceGetName, h)) for h in handles]
                if not handles:
                    self.reason = "NVML reports no GPU"
        if self.reason is not None:
            log.info("telemetry: GPU section skipped: %s", self.reason)

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML reading; a field the GPU does not support (power on some boards) is ``None``."""
        error: type[BaseException] = self._nvml.NVMLError if self._nvml is not None else Exception
        try:
            return fn(*args)
        except error:
            return None

    def sample(self) -> tuple[GpuSample, ...]:
        """Read every GPU now (empty without NVML)."""
        self._start()
        if not self._handles:
            return ()
        nv = self._nvml
        out = []
        for i, h in enumerate(self._handles):
            util = self._try(nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._try(nv.nvmlDeviceGetMemoryInfo, h)
            temp = self._try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            power_mw = self._try(nv.nvmlDeviceGetPowerUsage, h)
            procs = self._try(nv.nvmlDeviceGetComputeRunningProcesses, h)
            others = None if procs is None else sum(1 for p in procs if getattr(p, "pid", None) != self._pid)
            out.append(
                GpuSample(
                    index=i,
                    util_percent=float(util.gpu) if util is not None else None,
                    mem_used_mb=mem.used / 2**20 if mem is not None else None,
                    mem_total_mb=mem.total / 2**20 if mem is not None else None,
                    temp_c=float(temp) if temp is not None else None,
                    power_w=power_mw / 1000.0 if power_mw is not None else None,
                    name=self._names[i] or None,
                    other_processes=others,
                )
            )
        return tuple(out)

    def close(self) -> None:
        """Shut NVML down."""
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml = None
            self._handles = []


def _nvml_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""
