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

from edge_agent.telemetry.nvml import NvmlProbe
from edge_agent.telemetry.publisher import TelemetryPublisher, encode_telemetry, period_from_profile
from edge_agent.telemetry.sampler import TelemetrySampler
from edge_agent.telemetry.samples import TRAINING_STATES, GpuSample, ResourceSample, clean_section

__all__ = [
    "TRAINING_STATES",
    "GpuSample",
    "NvmlProbe",
    "ResourceSample",
    "TelemetryPublisher",
    "TelemetrySampler",
    "clean_section",
    "encode_telemetry",
    "period_from_profile",
]
