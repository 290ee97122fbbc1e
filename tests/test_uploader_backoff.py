"""The uploader backs off when no acknowledgement comes (issue 19 item 1: no resend storms at fleet scale)."""

from __future__ import annotations

import random
import threading
import time

import numpy as np

from edge_agent.uploader import MAX_BACKOFF, Uploader, ack_wait
from protocol.frame import encode_update
from protocol.memory_transport import MemoryBroker, MemoryTransport
from protocol.messages import Ack, Task
from protocol.topics import Topics


def test_ack_wait_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(0)
    for unanswered in range(8):
        waits = [ack_wait(10.0, unanswered, rng) for _ in range(200)]
        factor = min(2 ** unanswered, MAX_BACKOFF)
        assert 8.0 * factor <= min(waits) and max(waits) <= 12.0 * factor
        assert max(waits) - min(waits) > 0.5 * factor  # jittered, so boxes do not resend in step


def _upload(answer: bool, seconds: float) -> tuple[int, Ack | None]:
    broker, topics = MemoryBroker(), Topics("t")
    agent, coord = MemoryTransport(broker, "a1"), MemoryTransport(broker, "coordinator")
    agent.connect()
    coord.connect()
    frame = encode_update({"w": np.ones((4, 4), np.float32)}, agent_id="a1", round_id=1, base_version="v0",
                          sample_count=3)
    sends: list[float] = []

    def on_update(topic: str, payload: bytes) -> None:
        sends.append(time.monotonic())
        if answer and len(sends) == 3:  # the first two attempts are "lost"
            from protocol.frame import read_header

            uid = read_header(frame)[0].update_id
            coord.publish(topics.acks("a1"), Ack(update_id=uid, round_id=1, status="accepted").to_bytes())

    coord.subscribe(topics.updates("a1", 1), on_update)
    up = Uploader("a1", agent, topics, ack_timeout_s=0.05, rng=random.Random(1))
    up.attach()
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    task = Task(round_id=1, base_version="v0", deadline=time.time() + 60, chunk_bytes=1024)
    ack = up.upload(task, frame, stop)
    stop.set()
    agent.close()
    coord.close()
    return len(sends), ack


def test_unanswered_uploads_are_resent_less_and_less_often() -> None:
    attempts, ack = _upload(answer=False, seconds=2.0)
    assert ack is None
    # fixed 0.05 s waits would resend ~40 times in 2 s; doubling up to 8x (0.4 s) leaves ~8
    assert 4 <= attempts <= 12


def test_a_lost_update_is_still_resent_until_accepted() -> None:
    attempts, ack = _upload(answer=True, seconds=10.0)
    assert ack is not None and ack.status == "accepted"
    assert attempts == 3
