"""Closing a round: its accepted updates, aggregated, evaluated, recorded and published.

:class:`RoundCloser` takes the round's accepted updates, sorted by agent id, and streams them to
``strategy.aggregate_stream``: their sample counts from the store, their tensors decoded from the
blob store one at a time as the strategy reads them (the intake keeps none in memory), so a
streaming strategy's memory grows with the model, not with the number of agents, and a round
found ``aggregating`` after a restart is aggregated again to the same result. It
evaluates the new weights, publishes them as the round's version and records the round
``complete`` with what aggregation did, the traffic, per-phase timings and each DP agent's
reported ε. A round that cannot aggregate (too few updates for the strategy, a strategy that
raises, a frame gone from the blob store) is marked ``failed`` with a reason and a
``round_failed`` event, and the loop goes on; only database errors escape (restart resumes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from coordinator.rounds.publishing import ModelPublisher
from coordinator.rounds.settings import version_name
from coordinator.rounds.state import OpenRound
from coordinator.states import RoundStatus
from coordinator.store import BlobCorruptError, BlobStore, NotFoundError, Store, StoreError
from coordinator.strategies import ClientResult, Strategy
from coordinator.strategies.base import ClientInfo
from protocol.codec import Tensors
from protocol.errors import Reason
from protocol.frame import decode_update, read_header
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator")

RoundListener = Callable[[int, str, dict[str, float]], None]  # round, version, metrics


def client_privacy(results: Sequence[ClientResult | ClientInfo]) -> dict[str, dict[str, float]]:
    """What each DP-SGD agent reported with its update, agents without DP left out.

    ε spent so far (all its updates), δ, its budget and noise multiplier
    (``edge_agent.private_training``).
    """
    return {r.agent_id: {k.removeprefix("dp_"): float(v) for k, v in r.metrics.items() if k.startswith("dp_")}
            for r in results if "dp_epsilon" in r.metrics}


class _PhaseClock:
    """Milliseconds spent in each named phase since the previous mark (recorded with each round)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self.phases_ms: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases_ms[phase] = round(1000 * (now - self._t), 1)
        self._t = now


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


class RoundCloser:
    """Aggregates a collected round into a new version, or fails it with a reason."""

    def __init__(self, *, store: Store, blobs: BlobStore, transport: Transport, strategy: Strategy,
                 state: OpenRound, publisher: ModelPublisher, on_round: RoundListener | None = None) -> None:
        self.store, self.blobs, self.transport, self.strategy = store, blobs, transport, strategy
        self.state, self.publisher, self.on_round = state, publisher, on_round

    def clients(self, round_id: int) -> tuple[list[ClientInfo], list[str]]:
        """The round's accepted updates without their tensors, sorted by agent id, and their blobs."""
        updates = sorted(self.store.list_updates(round_id), key=lambda u: u.agent_id)
        return ([ClientInfo(u.agent_id, u.sample_count, dict(u.metrics), u.staleness) for u in updates],
                [u.blob_sha256 for u in updates])

    def load(self, blob_sha256: str, staleness: int) -> Tensors:
        """One accepted update as a client model on the round's base: decoded from its stored frame.

        A stale (async) update is decoded against the base it was trained from and discounted.
        """
        state = self.state
        frame = self.blobs.get(blob_sha256)
        trained_from = state.tensors_of(read_header(frame)[0].base_version)
        client = decode_update(frame, expected=state.specs, base=trained_from).tensors
        return state.discounted(client, trained_from, staleness)

    def results(self, round_id: int) -> list[ClientResult]:
        """The round's accepted updates as client models, all in memory (for strategies that need them so)."""
        infos, shas = self.clients(round_id)
        return [ClientResult(c.agent_id, self.load(sha, c.staleness), c.sample_count, c.metrics, c.staleness)
                for c, sha in zip(infos, shas, strict=True)]

    def fail(self, round_id: int, reason: Reason, message: str) -> None:
        """Give a round up with a reason, audited then recorded; the loop goes on with the next one."""
        log.error("round %d failed (%s): %s", round_id, reason, message)
        self.store.record_event("round_failed", round_id=round_id, reason=reason, detail={"message": message[:500]})
        self.store.set_round_status(round_id, RoundStatus.FAILED, detail={"reason": reason, "message": message[:500]})

    def close(self, round_id: int) -> None:
        """Aggregate, evaluate, publish and record ``round_id`` (or fail it)."""
        self.store.set_round_status(round_id, RoundStatus.AGGREGATING)
        base, base_version = self.state.base, self.state.base_version
        assert base is not None and base_version is not None
        clock = _PhaseClock()
        try:  # a round that cannot aggregate fails alone: the coordinator must not exit and resume into it forever
            results, shas = self.clients(round_id)
            if len(results) < self.strategy.min_results:
                self.fail(round_id, Reason.TOO_FEW_UPDATES, f"{len(results)} updates; strategy "
                          f"{self.strategy.name} needs at least {self.strategy.min_results}")
                return
            new, report = self.strategy.aggregate_stream(
                round_id, base, results, lambda i: self.load(shas[i], results[i].staleness))
            clock.mark("aggregate")
            step = self.publisher.step(version_name(round_id), round_id, base_version, base, new)
            if step is not None:  # the version is what the boxes rebuild from the compressed step
                new = step.tensors
                clock.mark("downlink_step")
            metrics = self.publisher.evaluate(new)
            clock.mark("evaluate")
        except (NotFoundError, BlobCorruptError) as exc:  # an accepted update's frame is gone or damaged
            self.fail(round_id, Reason.BLOB_MISSING if isinstance(exc, NotFoundError) else Reason.BLOB_CORRUPT,
                      str(exc))
            return
        except StoreError:
            raise  # the database itself: exit, restart and resume this round
        except Exception as exc:
            log.exception("round %d: aggregation failed", round_id)
            self.fail(round_id, Reason.AGGREGATION_FAILED, f"{type(exc).__name__}: {exc}")
            return
        version = version_name(round_id)
        participants = [r.agent_id for r in results]
        manifest = self.publisher.manifest_for(version, base_version, round_id, new, metrics, participants)
        clock.mark("manifest")
        self.publisher.save(manifest, new, self.strategy, round_id=round_id, step=step)
        clock.mark("save")
        traffic = self.transport.traffic
        self.store.set_round_status(round_id, RoundStatus.COMPLETE, result_version=version,
                                    detail={"metrics": manifest.metrics, "aggregation": _jsonable(report.details),
                                            "traffic": {"rx_bytes": traffic.rx_bytes, "tx_bytes": traffic.tx_bytes},
                                            "phases_ms": clock.phases_ms,
                                            "client_privacy": client_privacy(results)})
        self.publisher.publish(version)
        log.info("round %d complete: %s from %s, %s", round_id, version, participants,
                 {k: round(v, 4) for k, v in manifest.metrics.items()})
        log.debug("round %d phases (ms): %s", round_id, clock.phases_ms)
        if self.on_round is not None:
            self.on_round(round_id, version, dict(manifest.metrics))
