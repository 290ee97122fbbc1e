"""Telemetry benchmark: the sampler's CPU overhead and the bytes each sample costs on the wire.

A 5 s period is too slow to measure directly in a benchmark, so each stage runs many times back
to back and its process CPU time per sample (``time.process_time``: all threads of this process,
paho's network thread included) is scaled to the period: ``cpu_percent_of_core = cpu_s_per_sample
/ period_s * 100``. Stages:

* ``sample`` — psutil (CPU times, memory, disk, temperatures) + NVML where a GPU is present;
* ``sample+encode`` — plus the telemetry message with inference/training/model sections and
  its compact JSON encoding (``bytes_per_sample``);
* ``sample+encode+publish`` — plus a QoS-0 publish through ``MqttTransport`` to a private
  mosquitto (skipped without the ``mosquitto`` binary);
* ``publisher-thread`` — the real ``TelemetryPublisher`` thread at a short period for a few seconds
  of wall time; its CPU per sample is scaled the same way (checks the scheduler/thread overhead).

Target: < 1 % of one core at a 5 s period. Rows go to ``bench/results/telemetry.json`` as
``{"rows": [...], "target": ..., "meta": ...}``.

    .venv/bin/python bench/telemetry.py            # full (~30 s)
    .venv/bin/python bench/telemetry.py --quick    # < 20 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from _common import standard_meta  # noqa: E402

from edge_agent.metrics import AgentMetrics  # noqa: E402
from edge_agent.telemetry import TelemetryPublisher, TelemetrySampler, encode_telemetry  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from protocol.transport import MemoryBroker, MemoryTransport, MqttTransport  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "telemetry.json"
PERIOD_S = 5.0
TARGET_CPU_PERCENT_OF_CORE = 1.0
TOPIC = Topics("bench").telemetry("box-bench-01")


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def mqtt_publish_bytes(topic: str, payload_len: int) -> int:
    """Bytes of an MQTT 3.1.1 QoS-0 PUBLISH packet: fixed header + topic (2 + len) + payload."""
    remaining = 2 + len(topic.encode()) + payload_len
    return 1 + _varint_len(remaining) + remaining


def _sampler() -> tuple[TelemetrySampler, AgentMetrics]:
    """A sampler with realistic provider sections (inference counters, training progress, model)."""
    m = AgentMetrics()
    for ms in (8, 11, 14, 35):
        m.observe_inference(ms / 1000)
    m.training_started(round_id=12, steps_total=400)
    m.training_step_done(123, loss=0.3831)
    m.set_model_version("g-000012")
    return TelemetrySampler(inference=m.inference_summary, training=m.training_summary,
                            model_version=m.model_version), m


def _measure(name: str, n: int, step: Callable[[], int]) -> dict[str, Any]:
    for _ in range(5):  # warm-up: NVML init, first psutil reads, JIT-free but cache-warm
        step()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    total_bytes = 0
    for _ in range(n):
        total_bytes += step()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    cpu_per = cpu / n
    row: dict[str, Any] = {
        "stage": name,
        "samples": n,
        "sample_ms": round(1000 * cpu_per, 4),
        "wall_ms_per_sample": round(1000 * wall / n, 4),
        "period_s": PERIOD_S,
        "cpu_percent_of_core": round(100 * cpu_per / PERIOD_S, 5),
    }
    if total_bytes:
        per = total_bytes / n
        row["bytes_per_sample"] = round(per, 1)
        row["mqtt_bytes_per_message"] = mqtt_publish_bytes(TOPIC, round(per))
        row["mqtt_bytes_per_day"] = int(row["mqtt_bytes_per_message"] * 86400 / PERIOD_S)
    return row


@contextlib.contextmanager
def _mosquitto() -> Iterator[int | None]:
    exe = shutil.which("mosquitto")
    if exe is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield port
        finally:
            proc.kill()
            proc.wait(5)


def run(quick: bool) -> dict[str, Any]:
    n = 300 if quick else 3000
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    sampler, _ = _sampler()

    def only_sample() -> int:
        sampler.sample()
        return 0

    def sample_encode() -> int:
        return len(encode_telemetry(sampler.to_message(sampler.sample())))

    rows.append(_measure("sample", n, only_sample))
    rows.append(_measure("sample+encode", n, sample_encode))

    with _mosquitto() as port:
        if port is None:
            skipped.append("sample+encode+publish: mosquitto binary not installed")
        else:
            transport = MqttTransport("box-bench-01", "127.0.0.1", port, clean_session=True)
            transport.connect()

            def publish() -> int:
                payload = encode_telemetry(sampler.to_message(sampler.sample()))
                transport.publish(TOPIC, payload, qos=0)
                return len(payload)

            row = _measure("sample+encode+publish", n, publish)
            time.sleep(0.2)  # let paho's network thread flush (its CPU was counted while it ran)
            transport.close()
            row["transport"] = "MqttTransport QoS 0 -> mosquitto (loopback)"
            rows.append(row)

    # The real publisher thread at a short period, for a few seconds of wall time.
    seconds, period = (2.0, 0.02) if quick else (10.0, 0.02)
    broker = MemoryBroker()
    mem = MemoryTransport(broker, "box-bench-01")
    mem.connect()
    publisher = TelemetryPublisher(_sampler()[0], mem, TOPIC, period_s=period)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    publisher.start()
    time.sleep(seconds)
    publisher.stop()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    mem.close()
    per = cpu / max(1, publisher.messages)
    rows.append({
        "stage": "publisher-thread",
        "samples": publisher.messages,
        "sample_ms": round(1000 * per, 4),
        "wall_s": round(wall, 2),
        "run_period_s": period,
        "period_s": PERIOD_S,
        "cpu_percent_of_core": round(100 * per / PERIOD_S, 5),
        "bytes_per_sample": round(publisher.bytes / max(1, publisher.messages), 1),
    })

    worst = max(r["cpu_percent_of_core"] for r in rows)
    gpu = sampler.nvml.reason if sampler.nvml is not None and sampler.nvml.reason else "nvml"
    sampler.close()
    return {
        "rows": rows,
        "skipped": skipped,
        "target": {
            "cpu_percent_of_core_max": TARGET_CPU_PERCENT_OF_CORE,
            "period_s": PERIOD_S,
            "worst_cpu_percent_of_core": worst,
            "met": worst < TARGET_CPU_PERCENT_OF_CORE,
        },
        "meta": {
            "quick": quick,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "psutil": psutil.__version__,
            "gpu_section": gpu,
            "temperature_sensors": len(sampler.sample().temperatures_c),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples, < 20 s")
    ap.add_argument("--out", type=Path, default=None, help="default: telemetry.json (telemetry.quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = RESULTS.with_name("telemetry.quick.json") if args.quick else RESULTS
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    result = run(args.quick)
    result["meta"] = {**standard_meta(quick=args.quick), **result["meta"], "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["rows"]:
        print(f"{r['stage']:<24} {r['sample_ms']:8.3f} ms CPU/sample  {r['cpu_percent_of_core']:.4f} % of a core "
              f"at {PERIOD_S:g} s  {r.get('bytes_per_sample', '-')} B/sample")
    for s in result["skipped"]:
        print("skipped:", s)
    t = result["target"]
    print(f"target < {t['cpu_percent_of_core_max']} % of one core: {'met' if t['met'] else 'NOT met'} "
          f"(worst {t['worst_cpu_percent_of_core']:.4f} %) -> {args.out}")
    return 0 if t["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
