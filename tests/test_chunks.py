"""Issue 15 item 2: chunk reassembly is bounded and per sender; real bytes never pass the declared size."""

from __future__ import annotations

import hashlib
import json

import pytest

from protocol import envelope
from protocol.chunks import CHUNK_FORMAT, CHUNK_MAGIC, ChunkHeader, parse_chunk, split
from protocol.errors import FrameError
from protocol.reassembly import Reassembler, ReassemblyLimits

MiB = 1024 * 1024


def forged(transfer_id: str, data: bytes, *, index: int = 0, count: int = 1, total_bytes: int = 0,
           total_sha256: str = "0" * 64) -> bytes:
    """A chunk whose own checksum is right but whose header lies about the whole blob."""
    header = ChunkHeader(transfer_id=transfer_id, index=index, count=count, sha256=hashlib.sha256(data).hexdigest(),
                         total_sha256=total_sha256, total_bytes=total_bytes)
    return envelope.pack(CHUNK_MAGIC, CHUNK_FORMAT, header.model_dump_json().encode(), data)


def test_a_chunk_cannot_carry_more_than_its_blob_declares() -> None:
    with pytest.raises(FrameError) as e:
        parse_chunk(forged("t", b"x" * (20 * MiB), total_bytes=0))  # declares 0 bytes, carries 20 MiB
    assert e.value.reason == "size_mismatch"
    with pytest.raises(FrameError) as e:
        parse_chunk(forged("t", b"", count=1000, total_bytes=10))  # 1000 (empty) chunks of a 10-byte blob
    assert e.value.reason == "bad_header"
    with pytest.raises(FrameError) as e:
        parse_chunk(forged("t", b"", count=2, total_bytes=10))
    assert e.value.reason == "bad_header"
    assert parse_chunk(split(b"", "empty", 10)[0]).data == b""  # an empty blob is one empty chunk


def test_the_sum_of_chunks_cannot_pass_the_declared_size() -> None:
    r = Reassembler()
    total = hashlib.sha256(b"abcd").hexdigest()
    r.add("a1", parse_chunk(forged("t", b"abc", index=0, count=2, total_bytes=4, total_sha256=total)))
    with pytest.raises(FrameError) as e:  # chunk 1 claims 3 more bytes of a 4-byte blob
        r.add("a1", parse_chunk(forged("t", b"xyz", index=1, count=2, total_bytes=4, total_sha256=total)))
    assert e.value.reason == "size_mismatch"
    got = r.get("a1", "t")
    assert got is not None and got.received == 3 and r.held_bytes() <= r.declared_bytes()


def test_transfers_are_keyed_per_sender() -> None:
    victim = split(b"v" * 1000, "u-1", 100)
    r = Reassembler()
    for m in victim[:5]:
        r.add("victim", parse_chunk(m))
    attacker = split(b"z" * 5000, "u-1", 100)  # the victim's transfer id, another count
    r.add("attacker", parse_chunk(attacker[0]))
    for m in victim[5:]:
        rec = r.add("victim", parse_chunk(m))
    assert rec.complete and rec.blob() == b"v" * 1000  # untouched by the attacker
    r.discard("attacker", "u-1")
    assert r.get("victim", "u-1") is not None


def test_junk_transfers_of_one_sender_never_evict_another_senders() -> None:
    r = Reassembler(ReassemblyLimits(max_transfers_per_sender=4))
    victim = split(b"v" * 1000, "u-victim", 100)
    r.add("victim", parse_chunk(victim[0]))
    for i in range(300):  # more junk than the old shared 256-transfer table held
        r.add("attacker", parse_chunk(split(b"j" * 200, f"junk-{i}", 100)[0]))
    assert r.open_transfers("attacker") == 4 and r.evicted == 296
    for m in victim[1:]:
        rec = r.add("victim", parse_chunk(m))
    assert rec.complete and rec.blob() == b"v" * 1000


def test_declared_bytes_are_capped_per_sender_and_overall() -> None:
    lim = ReassemblyLimits(max_transfer_bytes=10_000, max_bytes_per_sender=15_000, max_total_bytes=25_000)
    r = Reassembler(lim)
    with pytest.raises(FrameError) as e:
        r.add("a1", parse_chunk(split(b"x" * 10_001, "big", 5000)[0]))
    assert e.value.reason == "too_large" and r.open_transfers() == 0
    r.add("a1", parse_chunk(split(b"x" * 10_000, "t1", 5000)[0]))
    r.add("a1", parse_chunk(split(b"y" * 10_000, "t2", 5000)[0]))  # 20 000 > 15 000: a1's own t1 goes
    assert r.get("a1", "t1") is None and r.get("a1", "t2") is not None and r.declared_bytes("a1") == 10_000
    r.add("a2", parse_chunk(split(b"z" * 10_000, "t1", 5000)[0]))
    with pytest.raises(FrameError) as e:  # 30 000 > 25 000 overall: refused, nobody else's transfer dropped
        r.add("a3", parse_chunk(split(b"w" * 10_000, "t1", 5000)[0]))
    assert e.value.reason == "too_many_transfers"
    assert r.get("a1", "t2") is not None and r.get("a2", "t1") is not None and r.open_transfers("a3") == 0


def test_idle_transfers_expire() -> None:
    now = [0.0]
    r = Reassembler(ReassemblyLimits(max_idle_s=60), clock=lambda: now[0])
    msgs = split(b"q" * 300, "slow", 100)
    r.add("a1", parse_chunk(msgs[0]))
    now[0] = 30.0
    r.add("a1", parse_chunk(msgs[1]))  # activity keeps it alive
    now[0] = 89.0
    r.add("a2", parse_chunk(split(b"k", "other", 10)[0]))
    assert r.get("a1", "slow") is not None
    now[0] = 91.0
    r.add("a2", parse_chunk(split(b"k", "other2", 10)[0]))
    assert r.get("a1", "slow") is None and r.evicted == 1


def test_limits_must_hold_a_transfer() -> None:
    with pytest.raises(ValueError):
        ReassemblyLimits(max_transfers_per_sender=0)


def test_split_chunks_parse_and_header_json_is_plain() -> None:
    msgs = split(b"hello world", "t", 4)
    assert [parse_chunk(m).header.index for m in msgs] == [0, 1, 2]
    head, _ = envelope.unpack(msgs[0], magic=CHUNK_MAGIC, fmt=CHUNK_FORMAT, max_header=4096, what="chunk")
    assert json.loads(head)["total_bytes"] == 11
