"""Resource telemetry of an edge box: a sampler (psutil + NVML) and a periodic MQTT publisher.

What a sample holds is fixed here and nowhere else: CPU, memory, disk, temperatures (one
maximum per sensor chip, where the OS exposes them), per-GPU utilization / memory /
temperature / power through NVML, and two small numeric sections filled by providers (inference
counters, training progress) plus the served model version. Every provider value passes
:func:`_clean_section`: keys are short snake_case names, values are finite numbers, and the only
string allowed is the training ``state`` from a fixed vocabulary. So nothing a provider might
accidentally return (a file name, a study UID, a patient name) can reach the wire. The module
never logs sample contents, only why a source is unavailable.

NVML (``pynvml`` from nvidia-ml-py) is imported lazily on first use; without a driver or GPU the
GPU section is left out and the reason logged once at INFO.

Messages are published with QoS 0 (telemetry is periodic; a lost sample is replaced by the next)
and encoded compactly: ``None`` and empty sections dropped, short numbers (timestamps to 1 ms,
other floats to 4 significant digits), no whitespace. The result still parses with ``parse_message(Telemetry, payload)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from protocol.messages import Telemetry
from protocol.profile import FirmwareProfile
from protocol.transport import Transport

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: The only string values a training section may carry (key ``state``).
TRAINING_STATES = frozenset({"idle", "waiting", "running", "paused", "uploading", "done", "failed"})

InferenceProvider = Callable[[], Mapping[str, float]]
TrainingProvider = Callable[[], Mapping[str, float | str]]
VersionProvider = Callable[[], str | None]


@dataclass(frozen=True)
class GpuSample:
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
        if self.mem_used_mb is None or not self.mem_total_mb:
            return None
        return 100.0 * self.mem_used_mb / self.mem_total_mb

    def to_wire(self) -> dict[str, float | str | None]:
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


class NvmlProbe:
    """Per-GPU readings through NVML, imported and initialised lazily; ``reason`` when unavailable."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._started = False
        self._pid = os.getpid()
        self.reason: str | None = None

    @property
    def available(self) -> bool:
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
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml = None
            self._handles = []


def _nvml_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def _clean_section(section: Mapping[str, Any] | None, *, allow_state: bool) -> dict[str, Any]:
    """Keep only ``snake_case`` keys with finite numbers (and a known training ``state``)."""
    out: dict[str, Any] = {}
    if not section:
        return out
    for key, value in section.items():
        if not isinstance(key, str) or not _KEY.match(key):
            continue
        if allow_state and key == "state":
            if isinstance(value, str) and value in TRAINING_STATES:
                out[key] = value
            continue
        num = _finite(value)
        if num is not None:
            out[key] = num
    return out


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
        idle = (now.idle + getattr(now, "iowait", 0.0)) - (last.idle + getattr(last, "iowait", 0.0))
        total = sum(now) - sum(last)
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
            values = [r.current for r in readings if _finite(r.current) is not None]
            key = re.sub(r"[^a-z0-9_]", "_", chip.lower())[:32]
            if values and _KEY.match(key):
                out[key] = max(values)
        if not out:
            self._once("temps", "telemetry: the OS exposes no temperature sensors")
        return out

    def sample(self) -> ResourceSample:
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
        version = self._provided("model_version", self.model_version)
        return Telemetry(
            at=sample.at,
            cpu_percent=sample.cpu_percent,
            memory_percent=sample.memory_percent,
            disk_percent=sample.disk_percent,
            temperatures_c=sample.temperatures_c,
            gpu=[g.to_wire() for g in sample.gpus],
            inference=_clean_section(self._provided("inference", self.inference), allow_state=False),
            training=_clean_section(self._provided("training", self.training), allow_state=True),
            model_version=version if isinstance(version, str) and _VERSION.match(version) else None,
        )

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.close()


def _compact(value: Any, key: str = "") -> Any:
    """Timestamps (``at``, ``*_at``) to 1 ms; other floats to 4 significant digits or 0.1; integral floats as ints."""
    if isinstance(value, float):
        if key == "at" or key.endswith("_at"):
            value = round(value, 3)
        else:
            value = float(f"{value:.4g}") if abs(value) < 1000 else round(value, 1)
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _compact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def encode_telemetry(message: Telemetry) -> bytes:
    """Compact JSON: no ``None``, no empty sections, short numbers (see :func:`_compact`)."""
    data = message.model_dump(exclude_none=True)
    out = {k: _compact(v, k) for k, v in data.items() if not (isinstance(v, dict | list) and not v)}
    return json.dumps(out, separators=(",", ":"), allow_nan=False).encode("utf-8")


def period_from_profile(profile: FirmwareProfile, default: float = 5.0) -> float:
    """The profile's ``telemetry.period_s``, else ``default``."""
    return profile.telemetry.period_s if profile.telemetry is not None else default


class TelemetryPublisher:
    """Samples every ``period_s`` and publishes on ``topic`` with QoS 0, on its own daemon thread.

    ``latest`` is the newest :class:`ResourceSample`; ``listeners`` are called with it after every
    sample (the gate controller subscribes here, so gates and telemetry share one reading).
    """

    def __init__(
        self,
        sampler: TelemetrySampler,
        transport: Transport,
        topic: str,
        *,
        period_s: float = 5.0,
    ) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be > 0")
        self.sampler = sampler
        self.transport = transport
        self.topic = topic
        self.period_s = period_s
        self.listeners: list[Callable[[ResourceSample], None]] = []
        self.latest: ResourceSample | None = None
        self.messages = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_once(self) -> bytes:
        sample = self.sampler.sample()
        self.latest = sample
        for listener in list(self.listeners):
            try:
                listener(sample)
            except Exception as exc:
                log.warning("telemetry listener failed: %s", exc.__class__.__name__)
        payload = encode_telemetry(self.sampler.to_message(sample))
        self.transport.publish(self.topic, payload, qos=0, retain=False)
        self.messages += 1
        self.bytes += len(payload)
        return payload

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.publish_once()
            except Exception as exc:  # broker away etc.: keep sampling, the next one may get through
                log.warning("telemetry publish failed: %s", exc.__class__.__name__)
            next_at += self.period_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspended box): do not burst, restart the schedule
                next_at, delay = time.monotonic(), 0.0
            self._stop.wait(delay)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
