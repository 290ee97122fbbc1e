"""Resource gates for training: diagnosis always comes first.

Two layers:

* :func:`gates_open` and :func:`in_training_window` — pure decisions over one
  :class:`~edge_agent.telemetry.ResourceSample`, the profile's ``ResourceGates`` and
  ``TrainingWindow`` and a wall-clock time; they return ``(open, reasons)``.
* :class:`GateController` — drives a trainer's pause hook. It pauses **at once** (the trainer
  stops at its next batch boundary) when a diagnosis request arrives (``on_inference_request``,
  wired to the inference API) or a gate closes (``observe``, wired to the telemetry sampler), and
  resumes only after ``quiet_s`` seconds in which no request arrived, none was in flight and every
  gate was open. ``should_pause`` is the same decision as a predicate a trainer may poll at each
  batch boundary.

Training window semantics (local wall-clock time of the box, minute resolution, both ends
inclusive): ``start <= end`` is a same-day window; ``start > end`` crosses midnight (19:00–06:00),
and the part after midnight belongs to the day the window started on, so ``days: [fri]`` with
19:00–06:00 is open Friday 19:00 to Saturday 06:00. The default 00:00–23:59 is always open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol

from edge_agent.telemetry import ResourceSample
from firmware.profile import FirmwareProfile, ResourceGates, TrainingWindow

log = logging.getLogger(__name__)

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def in_training_window(window: TrainingWindow | None, now: datetime) -> bool:
    """Whether ``now`` (the box's local time) lies in the training window; ``None`` = always."""
    if window is None:
        return True
    start, end = _minutes(window.start), _minutes(window.end)
    minute = now.hour * 60 + now.minute
    days = set(window.days)
    if start <= end:
        return start <= minute <= end and _DAYS[now.weekday()] in days
    if minute >= start:  # evening part: belongs to today's window
        return _DAYS[now.weekday()] in days
    if minute <= end:  # after midnight: belongs to yesterday's window
        return _DAYS[(now - timedelta(days=1)).weekday()] in days
    return False


def gates_open(
    sample: ResourceSample | None,
    gates: ResourceGates | None,
    now: datetime,
    window: TrainingWindow | None = None,
) -> tuple[bool, list[str]]:
    """Pure gate decision: ``(True, [])`` when training may run, else ``(False, reasons)``.

    A reading the box cannot provide (no GPU, no sensor) does not close a gate; a missing sample
    does, because then nothing is known about the load.

    Utilization gates judge the load of *others*, not the agent's own training (which would
    otherwise close the gate it is gated by, and flap): the CPU gate uses box CPU minus this
    process's CPU, and the GPU utilization gate applies only when NVML reports another compute
    process on that GPU (or cannot tell). The agent's own diagnosis load pauses training through
    :meth:`GateController.on_inference_request`. Temperature and free memory apply as measured.
    """
    reasons: list[str] = []
    if not in_training_window(window, now):
        assert window is not None
        reasons.append(f"outside training window {window.start}-{window.end} ({','.join(window.days)})")
    if gates is None:
        return not reasons, reasons
    if sample is None:
        reasons.append("no resource sample yet")
        return False, reasons
    if sample.cpu_percent is not None:
        others = max(0.0, sample.cpu_percent - (sample.own_cpu_percent or 0.0))
        if others > gates.max_cpu_percent:
            reasons.append(f"cpu (other processes) {others:.1f}% > {gates.max_cpu_percent:g}%")
    if sample.memory_available_mb is not None and sample.memory_available_mb < gates.min_free_memory_mb:
        reasons.append(f"free memory {sample.memory_available_mb:.0f} MB < {gates.min_free_memory_mb} MB")
    for g in sample.gpus:
        busy_by_others = g.other_processes is None or g.other_processes > 0
        if g.util_percent is not None and busy_by_others and g.util_percent > gates.max_gpu_percent:
            reasons.append(f"gpu{g.index} utilization {g.util_percent:.0f}% > {gates.max_gpu_percent:g}%")
        if g.temp_c is not None and g.temp_c > gates.max_gpu_temp_c:
            reasons.append(f"gpu{g.index} temperature {g.temp_c:.0f} C > {gates.max_gpu_temp_c:g} C")
    return not reasons, reasons


class PauseHookLike(Protocol):
    """What the controller needs of ``learning.trainer.PauseHook``."""

    def pause(self) -> None:
        """Pause training."""
    def resume(self) -> None:
        """Let training go on."""
    @property
    def paused(self) -> bool:
        """Whether training is paused."""


class GateController:
    """Pauses a trainer for diagnosis load or closed gates; resumes after a quiet period.

    Thread-safe. Wire it up as::

        ctl = GateController(profile.resource_gates, profile.training_window, hook=trainer_hook)
        publisher.listeners.append(ctl.observe)                  # resource samples
        service.on_inference_request.append(ctl.on_inference_request)  # DiagnosisService start hook
        service.on_result.append(ctl.on_inference_done)          # quiet period counts from the end
        ctl.start()                                              # re-evaluates every ``tick_s``

    (or wrap a request in ``with ctl.inference(): ...``, which also holds training while in flight).

    Training should call ``hook.wait_if_paused()`` before its first batch: the controller pauses
    the hook on attach when the gates are closed, so training starts only when they are open.
    ``gate_hold_s`` is the hysteresis for resource gates: while a closing reading is younger than
    that, the gates count as closed (a load that pauses training drops the utilization it caused,
    so without it training would flap).
    """

    def __init__(
        self,
        gates: ResourceGates | None,
        window: TrainingWindow | None = None,
        *,
        hook: PauseHookLike | None = None,
        quiet_s: float = 5.0,
        gate_hold_s: float | None = None,
        tick_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = datetime.now,
        on_change: Callable[[bool, list[str]], None] | None = None,
    ) -> None:
        """Gate training on ``cpu``/``gpu`` limits and the training ``window`` (``None``: that gate is off)."""
        self.gates = gates
        self.window = window
        self.quiet_s = quiet_s
        self.gate_hold_s = quiet_s if gate_hold_s is None else gate_hold_s
        self.tick_s = tick_s
        self.clock = clock
        self.wallclock = wallclock
        self.on_change = on_change
        self._lock = threading.RLock()
        self._hook: PauseHookLike | None = None
        self._sample: ResourceSample | None = None
        self._last_request: float | None = None
        self._in_flight = 0
        self._last_gate_closed: float | None = None
        self._paused = False
        self._reasons: list[str] = []
        self.pauses = 0
        self.resumes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if hook is not None:
            self.attach(hook)

    @classmethod
    def from_profile(cls, profile: FirmwareProfile, **kwargs: Any) -> GateController:
        """Gates and window from a firmware profile (either section may be absent: no limit)."""
        return cls(profile.resource_gates, profile.training_window, **kwargs)

    # -- inputs ---------------------------------------------------------------------------------
    def attach(self, hook: PauseHookLike) -> None:
        """Drive ``hook`` from now on; pause it at once if training may not run now."""
        with self._lock:
            self._hook = hook
            self._paused = hook.paused
            self._apply(*self._decide())

    def observe(self, sample: ResourceSample) -> None:
        """Take a new resource sample (a ``TelemetryPublisher`` listener)."""
        with self._lock:
            self._sample = sample
            self.tick()

    def on_inference_request(self, *_args: object, **_kwargs: object) -> None:
        """Pause training now: a diagnosis request arrived. Arguments are ignored, never logged."""
        with self._lock:
            self._last_request = self.clock()
            if self.gates is None or self.gates.pause_on_inference:
                self._apply(True, ["inference request"])

    def on_inference_done(self, *_args: object, **_kwargs: object) -> None:
        """Start the quiet period now: a diagnosis finished (``DiagnosisService.on_result``)."""
        with self._lock:
            self._last_request = self.clock()

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Mark a request in flight for its whole duration: training stays paused meanwhile."""
        with self._lock:
            self._in_flight += 1
        self.on_inference_request()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_request = self.clock()

    # -- decision -------------------------------------------------------------------------------
    def _decide(self) -> tuple[bool, list[str]]:
        now = self.clock()
        reasons: list[str] = []
        pause_on_inference = self.gates is None or self.gates.pause_on_inference
        if pause_on_inference:
            if self._in_flight > 0:
                reasons.append(f"{self._in_flight} inference request(s) in flight")
            elif self._last_request is not None and now - self._last_request < self.quiet_s:
                reasons.append(f"inference request {now - self._last_request:.1f}s ago (quiet period {self.quiet_s:g}s)")
        ok, gate_reasons = gates_open(self._sample, self.gates, self.wallclock(), self.window)
        if not ok:
            if self._sample is not None:  # a real closing reading starts the hold; "no sample yet" does not
                self._last_gate_closed = now
            reasons.extend(gate_reasons)
        elif self._last_gate_closed is not None and now - self._last_gate_closed < self.gate_hold_s:
            reasons.append(f"gates reopened {now - self._last_gate_closed:.1f}s ago (hold {self.gate_hold_s:g}s)")
        return bool(reasons), reasons

    def should_pause(self) -> bool:
        """Predicate form for a trainer's batch boundary."""
        with self._lock:
            return self._decide()[0]

    @property
    def paused(self) -> bool:
        """Whether the gates hold training paused now."""
        with self._lock:
            return self._paused

    @property
    def reasons(self) -> list[str]:
        """Why training is paused (the gates that are closed)."""
        with self._lock:
            return list(self._reasons)

    def tick(self) -> bool:
        """Re-evaluate and apply; returns whether training is (now) paused."""
        with self._lock:
            pause, reasons = self._decide()
            self._apply(pause, reasons)
            return self._paused

    def _apply(self, pause: bool, reasons: list[str]) -> None:
        self._reasons = reasons
        if pause == self._paused:
            return
        self._paused = pause
        if pause:
            self.pauses += 1
            log.info("training paused: %s", "; ".join(reasons))
        else:
            self.resumes += 1
            log.info("training resumed: gates open and no inference for %gs", self.quiet_s)
        if self._hook is not None:
            if pause:
                self._hook.pause()
            else:
                self._hook.resume()
        if self.on_change is not None:
            try:
                self.on_change(pause, list(reasons))
            except Exception as exc:
                log.warning("gate on_change callback failed: %s", exc.__class__.__name__)

    # -- background re-evaluation (resume after the quiet period, window edges) ------------------
    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("gate controller tick failed")

    def start(self) -> None:
        """Start the controller's thread (it re-checks the gates periodically)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gates", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the controller's thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
