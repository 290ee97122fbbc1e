"""Studies that arrived before the box had a model: kept, then diagnosed in arrival order.

A box beside a scanner accepts every valid study from an allowed AE title even before its first
model is installed (only diagnosis waits for the model): the DICOM listener keeps such a study
(checked, de-identified, stored, audited ``stored``) and this worker diagnoses the waiting studies,
oldest first, as soon as a model is served, and again after a restart. While studies are waiting,
new ones queue behind them, so the order is the scanner's order.
"""

from __future__ import annotations

import logging
import threading

from edge_agent.serving.diagnosis import DiagnosisService
from edge_agent.serving.model import LoadedModel

log = logging.getLogger("fedscan.agent.pending")


class PendingDiagnoses:
    """One thread that diagnoses the local store's waiting studies whenever a model is served."""

    def __init__(self, service: DiagnosisService) -> None:
        """Diagnose ``service``'s kept studies; woken by every model swap."""
        self.service = service
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.diagnosed = 0
        service.served.add_listener(self._on_swap)

    def _on_swap(self, model: LoadedModel) -> None:
        self._wake.set()

    def waiting(self) -> bool:
        """Whether studies wait for a diagnosis (a new study then queues behind them)."""
        return bool(self.service.store.pending())

    def wake(self) -> None:
        """Look at the waiting studies now (a study was kept, or a model came)."""
        self._wake.set()

    def start(self) -> None:
        """Start the worker (it also takes up studies left waiting before a restart)."""
        if self._thread is None:
            self._stop.clear()
            self._wake.set()
            self._thread = threading.Thread(target=self._run, name="pending-diagnoses", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker (waiting studies stay waiting, on disk)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            try:
                self.drain()
            except Exception:  # the worker outlives one bad study (or a full queue): it tries again shortly
                log.exception("diagnosing waiting studies failed")
                self._stop.wait(1.0)
                self._wake.set()

    def drain(self) -> int:
        """Diagnose every waiting study, oldest first, while a model is served; return how many."""
        done = 0
        while not self._stop.is_set() and self.service.served.ready and self.service.batcher.running:
            waiting = self.service.store.pending()
            if not waiting:
                break
            study_id, caller = waiting[0]
            diag = self.service.diagnose_kept(study_id, caller)
            done += 1
            if diag is not None:
                log.info("study %s (kept before a model was installed) diagnosed by %s", study_id, diag.model_version)
        self.diagnosed += done
        return done
