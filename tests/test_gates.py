"""Resource gates: the pure decision, training windows, and the controller driving a real PauseHook."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from edge_agent.gates import GateController, gates_open, in_training_window
from edge_agent.telemetry import GpuSample, ResourceSample
from firmware.profile import ResourceGates, TrainingWindow, find_profile
from learning.trainer import PauseHook

GATES = ResourceGates(max_cpu_percent=80, max_gpu_percent=70, max_gpu_temp_c=80, min_free_memory_mb=1024)
MONDAY = datetime(2026, 11, 23)  # a Monday
assert MONDAY.weekday() == 0


def at(day_offset: int, hh: int, mm: int = 0) -> datetime:
    return MONDAY + timedelta(days=day_offset, hours=hh, minutes=mm)


def sample(cpu: float = 20, own: float | None = 0, free_mb: float = 8000, gpus: tuple[GpuSample, ...] = ()
           ) -> ResourceSample:
    return ResourceSample(at=0, cpu_percent=cpu, own_cpu_percent=own, memory_percent=50,
                          memory_available_mb=free_mb, disk_percent=10, gpus=gpus)


# -- pure decision ----------------------------------------------------------------------------------
def test_open_when_everything_is_within_limits() -> None:
    gpu = GpuSample(0, util_percent=10, temp_c=60, other_processes=1)
    assert gates_open(sample(gpus=(gpu,)), GATES, at(0, 12)) == (True, [])
    assert gates_open(None, None, at(0, 12)) == (True, [])  # no gates configured


@pytest.mark.parametrize(
    ("s", "fragment"),
    [
        (sample(cpu=93), "cpu (other processes) 93.0% > 80%"),
        (sample(free_mb=300), "free memory 300 MB < 1024 MB"),
        (sample(gpus=(GpuSample(1, util_percent=95, temp_c=50, other_processes=2),)), "gpu1 utilization 95% > 70%"),
        (sample(gpus=(GpuSample(0, util_percent=5, temp_c=84),)), "gpu0 temperature 84 C > 80 C"),
        (None, "no resource sample yet"),
    ],
)
def test_each_gate_closes_with_its_reason(s: ResourceSample | None, fragment: str) -> None:
    ok, reasons = gates_open(s, GATES, at(0, 12))
    assert not ok
    assert reasons == [fragment]


def test_all_reasons_are_listed() -> None:
    hot_busy = GpuSample(0, util_percent=99, temp_c=90, other_processes=None)
    ok, reasons = gates_open(sample(cpu=99, free_mb=10, gpus=(hot_busy,)), GATES, at(0, 12))
    assert not ok and len(reasons) == 4


def test_the_agents_own_load_does_not_close_utilization_gates() -> None:
    # 95 % box CPU of which 60 % is this agent's training: others use 35 % -> open.
    assert gates_open(sample(cpu=95, own=60), GATES, at(0, 12)) == (True, [])
    # GPU at 99 % but NVML says no other compute process uses it: our own training -> open.
    mine = GpuSample(0, util_percent=99, temp_c=60, other_processes=0)
    assert gates_open(sample(gpus=(mine,)), GATES, at(0, 12)) == (True, [])
    # ... yet temperature applies whoever heats the GPU.
    hot = GpuSample(0, util_percent=99, temp_c=85, other_processes=0)
    assert gates_open(sample(gpus=(hot,)), GATES, at(0, 12))[0] is False


def test_no_gpu_means_no_gpu_gates() -> None:
    assert gates_open(sample(gpus=()), GATES, at(0, 12)) == (True, [])
    unknown = GpuSample(0)  # NVML fields unsupported on this board
    assert gates_open(sample(gpus=(unknown,)), GATES, at(0, 12)) == (True, [])


# -- training window --------------------------------------------------------------------------------
NIGHTS = TrainingWindow(start="19:00", end="06:00", days=["mon", "tue", "wed", "thu", "fri"])


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (at(0, 2), False),  # Monday 02:00 belongs to Sunday night, not enabled
        (at(0, 18, 59), False),
        (at(0, 19), True),  # Monday 19:00
        (at(1, 5, 59), True),  # Tuesday 05:59, Monday night
        (at(1, 6, 0), True),  # end minute inclusive
        (at(1, 6, 1), False),
        (at(1, 12), False),  # Tuesday noon
        (at(4, 23), True),  # Friday 23:00
        (at(5, 2), True),  # Saturday 02:00: Friday night continues
        (at(5, 7), False),
        (at(5, 20), False),  # Saturday evening not enabled
        (at(6, 23, 59), False),  # Sunday
    ],
)
def test_overnight_window(when: datetime, expected: bool) -> None:
    assert in_training_window(NIGHTS, when) is expected
    ok, reasons = gates_open(sample(), GATES, when, NIGHTS)
    assert ok is expected
    assert expected or reasons == ["outside training window 19:00-06:00 (mon,tue,wed,thu,fri)"]


def test_day_window_and_default_window() -> None:
    office = TrainingWindow(start="09:00", end="17:30", days=["sat", "sun"])
    assert in_training_window(office, at(5, 9))
    assert in_training_window(office, at(6, 17, 30))
    assert not in_training_window(office, at(5, 8, 59))
    assert not in_training_window(office, at(0, 12))
    always = TrainingWindow()
    assert all(in_training_window(always, MONDAY + timedelta(minutes=m)) for m in range(0, 7 * 24 * 60, 7))
    assert in_training_window(None, at(3, 3))


def test_gates_from_a_shipped_profile() -> None:
    profile = find_profile("xray-gpu-224")
    assert profile.resource_gates is not None and profile.training_window is not None
    night, day = at(2, 23), at(2, 11)
    assert gates_open(sample(), profile.resource_gates, night, profile.training_window)[0]
    assert not gates_open(sample(), profile.resource_gates, day, profile.training_window)[0]
    ctl = GateController.from_profile(profile, wallclock=lambda: day)
    ctl.observe(sample())
    assert ctl.paused and ctl.reasons[0].startswith("outside training window 19:00-06:00")


# -- controller -------------------------------------------------------------------------------------
@dataclass
class Clock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


def controller(clock: Clock, **kw: object) -> tuple[GateController, PauseHook]:
    hook = PauseHook()
    ctl = GateController(GATES, None, hook=hook, quiet_s=5, clock=clock, wallclock=lambda: at(0, 12), **kw)  # type: ignore[arg-type]
    ctl.observe(sample())
    return ctl, hook


def test_inference_request_pauses_at_once_and_resumes_after_quiet_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    ctl, hook = controller(clock)
    assert not hook.paused and not ctl.paused
    ctl.on_inference_request({"study_uid": "1.2.840.113619.2.55.3.6046", "patient": "DOE^JANE"})
    assert hook.paused, "must pause synchronously: the trainer stops at its next batch boundary"
    clock.t += 3
    ctl.on_inference_request()  # a second request restarts the quiet period
    clock.t += 4.9
    assert ctl.tick() is True and hook.paused
    clock.t += 0.2
    assert ctl.tick() is False and not hook.paused
    assert (ctl.pauses, ctl.resumes) == (2, 2)  # the first pair: attached before the first sample
    assert "training paused: inference request" in caplog.text
    assert "DOE" not in caplog.text and "113619" not in caplog.text  # request arguments are never logged


def test_quiet_period_counts_from_the_end_of_a_slow_request() -> None:
    clock = Clock()
    ctl, hook = controller(clock)
    ctl.on_inference_request()  # DiagnosisService.on_inference_request hook: takes no arguments
    clock.t += 4.5
    ctl.on_inference_done(4.5, "ok")  # DiagnosisService.on_result hook: (latency_s, outcome)
    clock.t += 4.9
    assert ctl.tick() and hook.paused
    clock.t += 0.2
    assert not ctl.tick() and not hook.paused


def test_request_in_flight_keeps_training_paused() -> None:
    clock = Clock()
    ctl, hook = controller(clock)
    with ctl.inference():
        assert hook.paused
        clock.t += 60  # a slow request: still in flight
        assert ctl.tick() and "1 inference request(s) in flight" in ctl.reasons
    clock.t += 4
    assert ctl.tick() and hook.paused
    clock.t += 1.1
    assert not ctl.tick() and not hook.paused


def test_closed_gate_pauses_and_holds_before_resuming() -> None:
    clock = Clock()
    changes: list[tuple[bool, list[str]]] = []
    ctl, hook = controller(clock, gate_hold_s=10, on_change=lambda p, r: changes.append((p, r)))
    assert changes == [(True, ["no resource sample yet"]), (False, [])]  # attached before the first sample
    changes.clear()
    ctl.observe(sample(gpus=(GpuSample(0, util_percent=20, temp_c=88),)))
    assert hook.paused and ctl.reasons == ["gpu0 temperature 88 C > 80 C"]
    clock.t += 1
    ctl.observe(sample())  # cooled down
    assert hook.paused and ctl.reasons[0].startswith("gates reopened")
    clock.t += 9.5
    assert not ctl.tick() and not hook.paused
    assert [p for p, _ in changes] == [True, False]


def test_training_does_not_start_while_gates_are_closed() -> None:
    hook = PauseHook()
    night_only = TrainingWindow(start="19:00", end="06:00")
    ctl = GateController(GATES, night_only, hook=hook, wallclock=lambda: at(0, 12))
    ctl.observe(sample())
    assert hook.paused
    with pytest.raises(TimeoutError):
        hook.wait_if_paused(timeout=0.1)  # what the trainer calls before its first batch
    ctl.wallclock = lambda: at(0, 19, 30)
    ctl.gate_hold_s = 0
    assert not ctl.tick()
    assert hook.wait_if_paused(timeout=1) < 1


def test_pause_on_inference_can_be_switched_off() -> None:
    clock = Clock()
    hook = PauseHook()
    gates = GATES.model_copy(update={"pause_on_inference": False})
    ctl = GateController(gates, None, hook=hook, clock=clock, wallclock=lambda: at(0, 12))
    ctl.observe(sample())
    ctl.on_inference_request()
    assert not hook.paused


def test_should_pause_predicate_on_the_hook() -> None:
    clock = Clock()
    ctl = GateController(GATES, None, clock=clock, quiet_s=2, wallclock=lambda: at(0, 12))
    ctl.observe(sample())
    hook = PauseHook(should_pause=ctl.should_pause, poll_s=0.01)
    assert not hook.paused
    ctl.on_inference_request()
    assert hook.paused
    clock.t += 2.5
    assert not hook.paused


def test_background_thread_resumes_after_real_quiet_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.gates")
    hook = PauseHook()
    ctl = GateController(GATES, None, hook=hook, quiet_s=0.3, tick_s=0.02, wallclock=lambda: at(0, 12))
    ctl.observe(sample())
    ctl.start()
    try:
        t0 = time.monotonic()
        ctl.on_inference_request()
        waited = hook.wait_if_paused(timeout=3)
        assert 0.25 < time.monotonic() - t0 < 1.5 and waited > 0.2
    finally:
        ctl.stop()
    assert "training paused: inference request" in caplog.text and "training resumed" in caplog.text


# -- with the real training loop --------------------------------------------------------------------
def test_real_training_pauses_for_diagnosis_load_and_ends_bit_identical(pneumonia_npz: object) -> None:
    """Training (SmallCNN, batch 32, 1 thread) yields to a burst of diagnosis requests within one
    batch, resumes after the quiet period, and ends with the same weights as an uninterrupted run."""
    import torch

    from edge_agent.metrics import AgentMetrics
    from edge_agent.telemetry import TelemetryPublisher, TelemetrySampler
    from learning.datasets import ArrayDataset, load_medmnist
    from learning.models import SmallCNN
    from learning.trainer import train_local
    from protocol.messages import TrainingConfig
    from protocol.topics import Topics
    from protocol.transport import MemoryBroker, MemoryTransport

    full = load_medmnist(str(pneumonia_npz), "train")
    ds = ArrayDataset(full.images[:768], full.labels[:768], full.classes)
    cfg = TrainingConfig(local_epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=11)  # 24 steps
    torch.manual_seed(0)
    init = SmallCNN(in_channels=1, num_classes=2, width=16).state_dict()

    def fresh() -> SmallCNN:
        m = SmallCNN(in_channels=1, num_classes=2, width=16)
        m.load_state_dict(init)
        return m

    baseline = fresh()
    base_result = train_local(baseline, ds, cfg, threads=1)
    per_batch = base_result.seconds / base_result.steps

    # The agent's wiring: telemetry samples feed the gates; the diagnosis path calls ctl.inference().
    broker = MemoryBroker()
    transport = MemoryTransport(broker, "box-gates")
    transport.connect()
    metrics = AgentMetrics()
    hook = PauseHook()
    ctl = GateController(ResourceGates(max_cpu_percent=100, max_gpu_percent=100), None, hook=hook, quiet_s=0.5,
                         tick_s=0.02, on_change=metrics.on_gate_change)
    publisher = TelemetryPublisher(TelemetrySampler(), transport, Topics("g").telemetry("box-gates"), period_s=0.2)
    publisher.listeners.append(ctl.observe)
    publisher.publish_once()
    publisher.start()
    ctl.start()

    steps: list[tuple[float, int]] = []
    model = fresh()
    metrics.training_started(round_id=1, steps_total=base_result.steps)
    result: dict[str, object] = {}

    def run() -> None:
        def progress(step: int, planned: int, loss: float) -> None:
            steps.append((time.monotonic(), step))
            metrics.on_train_progress(step, planned, loss)

        result["r"] = train_local(model, ds, cfg, threads=1, pause=hook, progress=progress)

    trainer = threading.Thread(target=run)
    trainer.start()
    try:
        while len(steps) < 6:
            assert trainer.is_alive()
            time.sleep(0.005)
        first_request = time.monotonic()
        load_until = first_request + max(1.0, 20 * per_batch)
        while time.monotonic() < load_until:  # diagnosis requests every 50 ms, 20 ms each
            with ctl.inference():
                time.sleep(0.02)
            time.sleep(0.03)
        load_end = time.monotonic()
        trainer.join(timeout=60)
    finally:
        ctl.stop()
        publisher.stop()
        transport.close()

    during = [t for t, _ in steps if first_request < t]
    last_before_pause = max((t for t in during if t < load_end), default=first_request)
    pause_latency = last_before_pause - first_request
    after = [t for t in during if t > load_end]
    print(f"batch 32, {per_batch * 1000:.1f} ms/batch, paused {pause_latency * 1000:.0f} ms after the first request")
    assert pause_latency < 2.0, "training must stop at the next batch boundary, within 2 s"
    assert [t for t in during if last_before_pause < t < load_end] == []
    assert after and min(after) >= load_end + 0.4, "resumes only after the 0.5 s quiet period"
    assert hook.pauses >= 1 and not hook.paused
    # one burst of requests -> exactly one pause, no flapping between requests 30 ms apart
    assert metrics.registry.get_sample_value("fedscan_training_pauses_total", {"reason": "inference"}) == 1
    assert len(steps) == base_result.steps
    assert metrics.registry.get_sample_value("fedscan_training_step") == base_result.steps
    for (name, a), (_, b) in zip(baseline.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs from the uninterrupted run"
