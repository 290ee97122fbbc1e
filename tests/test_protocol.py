"""Protocol v1 contracts: topics, messages, chunks, frames, manifests, firmware profiles."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.profile import (
    ProfileError,
    TrainingSection,
    find_profile,
    load_profile,
    parse_profile,
    profiles_dir,
)
from protocol.chunks import parse_chunk, split
from protocol.errors import FrameError, MalformedMessage, UnknownTopic
from protocol.frame import decode_model, decode_update, encode_model, encode_update, read_header, specs_of
from protocol.identifiers import is_identifier, validate_id
from protocol.manifest import Architecture, InputSpec, Manifest, Signature, TensorEntry
from protocol.messages import (
    Ack,
    AckStatus,
    AgentEvent,
    EventDetail,
    EventKind,
    Loss,
    ModelRequest,
    Presence,
    Role,
    RoundMode,
    Shadow,
    ShadowDetail,
    Status,
    Task,
    Telemetry,
    TrainingConfig,
    TrainingState,
    parse_message,
)
from protocol.preprocessing import OPS, Resize, parse_steps
from protocol.reassembly import Reassembler
from protocol.tensors import tensor_hash
from protocol.topics import Kind, Topics


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
            "fc.bias": rng.normal(size=(2,)).astype(np.float32)}


# -- topics --------------------------------------------------------------------------------------
def test_every_topic_round_trips_through_parse() -> None:
    t = Topics("fleet-a")
    for kind in (Kind.STATUS, Kind.TELEMETRY, Kind.SHADOW_DESIRED, Kind.SHADOW_REPORTED, Kind.TASKS, Kind.ACKS,
                 Kind.MODEL_REQUEST, Kind.EVENTS, Kind.DOWNLOADS):
        p = t.parse(t.agent("box-1", kind))
        assert (p.kind, p.agent) == (kind, "box-1")
    p = t.parse(t.updates("box-1", 7))
    assert (p.kind, p.agent, p.round_id) == (Kind.UPDATES, "box-1", 7)
    assert t.parse(t.model_manifest("v3")).version == "v3"
    assert t.parse(t.model_chunks("v3")).kind is Kind.MODEL_CHUNKS
    assert t.parse(t.coordinator_status()).kind is Kind.COORDINATOR_STATUS


@pytest.mark.parametrize("topic", [
    "fedscan/v1/other-fleet/agents/a/status",      # another fleet
    "fedscan/v1/fleet-a/agents/a/unknown",         # not in the tree
    "fedscan/v1/fleet-a/agents/a/updates/x",       # round is not a number
    "fedscan/v1/fleet-a/agents/a+b/status",        # illegal id
    "fedscan/v1/fleet-a/models/v1/other",
])
def test_topics_outside_the_tree_are_refused(topic: str) -> None:
    with pytest.raises(UnknownTopic):
        Topics("fleet-a").parse(topic)


def test_ids_with_wildcards_cannot_build_topics() -> None:
    with pytest.raises(UnknownTopic):
        Topics().tasks("a/#")


# -- messages ----------------------------------------------------------------------------------------
def test_messages_refuse_unknown_fields_and_bad_json() -> None:
    ok = Task(round_id=1, base_version="v0", deadline=1.0)
    assert parse_message(Task, ok.to_bytes()) == ok
    with pytest.raises(MalformedMessage, match="Extra inputs"):
        parse_message(Ack, b'{"update_id":"u","round_id":1,"status":"accepted","surprise":1}')
    with pytest.raises(MalformedMessage):
        parse_message(Task, b"{not json")
    with pytest.raises(MalformedMessage):
        parse_message(Task, b'{"v":2,"round_id":1,"base_version":"v0","deadline":1}')


# -- chunks --------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=5000), size=st.integers(1, 700), seed=st.integers(0, 2**16))
def test_chunks_reassemble_in_any_order_with_duplicates(data: bytes, size: int, seed: int) -> None:
    msgs = split(data, "t1", size)
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(msgs))) + list(rng.integers(0, len(msgs), size=3))
    r = Reassembler()
    for i in order:
        rec = r.add("a1", parse_chunk(msgs[i]))
    assert rec.complete and rec.blob() == data


def test_chunk_corruption_and_changed_counts_are_refused() -> None:
    msgs = split(b"a" * 1000, "t1", 100)
    bad = bytearray(msgs[3])
    bad[-1] ^= 1
    with pytest.raises(FrameError) as e:
        parse_chunk(bytes(bad))
    assert e.value.reason == "checksum_mismatch"
    with pytest.raises(FrameError) as e:
        parse_chunk(msgs[0][:5])
    assert e.value.reason == "truncated"
    r = Reassembler()
    r.add("a1", parse_chunk(msgs[0]))
    other = split(b"a" * 1500, "t1", 100)  # same transfer id, different count
    with pytest.raises(FrameError) as e:
        r.add("a1", parse_chunk(other[1]))
    assert e.value.reason == "transfer_changed"
    transfer = r.get("a1", "t1")
    assert transfer is not None and transfer.missing == list(range(1, 10))


# -- update frames ----------------------------------------------------------------------------------------
def test_frame_round_trip_and_header() -> None:
    t = _tensors()
    f = encode_update(t, agent_id="a1", round_id=3, base_version="v2", sample_count=10, metrics={"loss": 0.5})
    h, _ = read_header(f)
    assert (h.agent_id, h.round_id, h.base_version, h.kind, h.codec, h.sample_count) == ("a1", 3, "v2", "full", "raw", 10)
    d = decode_update(f, expected=specs_of(t))
    assert all(np.array_equal(d.tensors[k], t[k]) for k in t)


@pytest.mark.parametrize("mutate,reason", [
    (lambda f: f[:-1], "truncated"),
    (lambda f: b"XXXX" + f[4:], "bad_magic"),
    (lambda f: f[:4] + b"\x09" + f[5:], "unsupported_version"),
    (lambda f: f[:-4] + bytes([f[-4] ^ 0xFF]) + f[-3:], "checksum_mismatch"),
])
def test_corrupt_frames_are_refused_with_reasons(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    t = _tensors()
    f = encode_update(t, agent_id="a1", round_id=1, base_version="v0", sample_count=1)
    with pytest.raises(FrameError) as e:
        decode_update(mutate(f), expected=specs_of(t))
    assert e.value.reason == reason


def test_wrong_shapes_nonfinite_and_implausible_norm_are_refused() -> None:
    t = _tensors()
    wrong = dict(t, **{"fc.bias": np.zeros(3, np.float32)})
    with pytest.raises(FrameError) as e:
        decode_update(encode_update(wrong, agent_id="a", round_id=1, base_version="v0", sample_count=1),
                      expected=specs_of(t))
    assert e.value.reason == "shape_mismatch"
    nan = dict(t, **{"fc.bias": np.array([np.nan, 1], np.float32)})
    with pytest.raises(FrameError) as e:
        decode_update(encode_update(nan, agent_id="a", round_id=1, base_version="v0", sample_count=1),
                      expected=specs_of(t))
    assert e.value.reason == "non_finite"
    huge = {k: v * 1e6 for k, v in t.items()}
    with pytest.raises(FrameError) as e:
        decode_update(encode_update(huge, agent_id="a", round_id=1, base_version="v0", sample_count=1),
                      expected=specs_of(t), base=t, max_update_norm=100.0)
    assert e.value.reason == "norm_too_large"


def test_unknown_codec_in_header_is_refused() -> None:
    t = _tensors()
    f = encode_update(t, agent_id="a", round_id=1, base_version="v0", sample_count=1)
    f2 = f.replace(b'"codec":"raw"', b'"codec":"zzz"')
    # the header length is unchanged (same number of bytes), the payload hash still matches
    with pytest.raises(FrameError) as e:
        decode_update(f2, expected=specs_of(t))
    assert e.value.reason == "unknown_codec"


def test_model_frames_are_bit_exact_and_hash_checked() -> None:
    old, new = _tensors(0), _tensors(1)
    h = tensor_hash(new)
    for frame, base in ((encode_model(new, version="v2"), None),
                        (encode_model(new, version="v2", base=old, base_version="v1"), old)):
        _, got = decode_model(frame, expected=specs_of(new), expected_hash=h, base=base)
        assert all(np.array_equal(got[k].view(np.uint32), new[k].view(np.uint32)) for k in new)
    with pytest.raises(FrameError) as e:
        decode_model(encode_model(new, version="v2"), expected=specs_of(new), expected_hash=tensor_hash(old))
    assert e.value.reason == "hash_mismatch"


# -- manifest -----------------------------------------------------------------------------------------------
def test_manifest_canonical_bytes_cover_everything_but_the_signature() -> None:
    t = _tensors()
    m = Manifest(version="v1", architecture=Architecture(name="small_cnn"), classes=["a", "b"],
                 input=InputSpec(channels=1, height=28, width=28),
                 tensors=[TensorEntry(name=k, shape=v.shape) for k, v in t.items()], tensor_hash=tensor_hash(t))
    signed = m.model_copy(update={"signature": Signature(key_id="k", value="c2ln")})
    assert m.canonical_bytes() == Manifest.model_validate(signed.model_dump()).canonical_bytes()
    assert m.canonical_bytes() != m.model_copy(update={"metrics": {"acc": 0.9}}).canonical_bytes()
    assert hashlib.sha256(m.canonical_bytes()).hexdigest() == hashlib.sha256(m.canonical_bytes()).hexdigest()


def test_tensor_hash_depends_on_exact_bits_and_order() -> None:
    t = _tensors()
    assert tensor_hash(t) != tensor_hash(dict(reversed(list(t.items()))))
    flipped = {k: v.copy() for k, v in t.items()}
    flipped["fc.bias"].view(np.uint32)[0] ^= 1
    assert tensor_hash(t) != tensor_hash(flipped)


# -- firmware profiles -----------------------------------------------------------------------------------------
def test_every_shipped_profile_validates() -> None:
    names = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
    assert names, "no profiles shipped"
    for n in names:
        assert find_profile(n).name == n


def test_malformed_profiles_name_file_line_and_field(tmp_path: Path) -> None:
    text = (profiles_dir() / "xray-cxr-28.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  lr: 0.05", "  lr: -1").replace("  width: 32", "  widht: 32"))
    with pytest.raises(ProfileError) as e:
        load_profile(bad)
    msg = str(e.value)
    assert f"{bad}:" in msg and "training.lr" in msg and "model.widht" in msg
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if "lr: -1" in s)
    assert f":{line}: training.lr" in msg
    with pytest.raises(ProfileError, match="not valid YAML"):
        parse_profile("name: [unclosed", "x.yaml")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.yaml")
    with pytest.raises(ProfileError, match="dp_sgd"):
        parse_profile(text.replace("  norm: group", "  norm: batch") + "privacy:\n  dp_sgd: true\n")


def test_profile_refuses_dp_sgd_with_qat() -> None:
    text = (profiles_dir() / "xray-cxr-28.yaml").read_text()
    assert "qat" not in text
    dp = text + "privacy:\n  dp_sgd: true\n"
    assert parse_profile(dp).privacy is not None  # DP alone is fine
    with pytest.raises(ProfileError, match="cannot be combined: opacus has no per-sample"):
        parse_profile(dp.replace("training:\n", "training:\n  qat: true\n"))


# -- typed messages and states ---------------------------------------------------------------------
def test_states_are_enums_and_keep_their_wire_strings() -> None:
    st = parse_message(Status, b'{"v":1,"state":"online","role":"coordinator"}')
    assert st.state is Presence.ONLINE and st.role is Role.COORDINATOR
    assert b'"state":"offline"' in Status(state=Presence.OFFLINE).to_bytes()
    task = parse_message(Task, Task(round_id=1, base_version="v0", mode=RoundMode.ASYNC, deadline=1.0).to_bytes())
    assert task.mode is RoundMode.ASYNC and task.training.loss is Loss.CE
    ack = parse_message(Ack, b'{"v":1,"update_id":"u","round_id":1,"status":"duplicate"}')
    assert ack.status is AckStatus.DUPLICATE and ack.status == "duplicate"
    for bad in (b'{"v":1,"state":"away"}', b'{"v":1,"update_id":"u","round_id":1,"status":"maybe"}'):
        with pytest.raises(MalformedMessage):
            parse_message(Status if b"state" in bad else Ack, bad)


def test_reported_shadow_detail_is_typed() -> None:
    sh = Shadow(version="v2", engine="ort-cpu-fp32", detail=ShadowDetail(
        agent="box-1", skipped={"tensorrt": "unavailable: no GPU"}, refused="v3", reason="unknown_key",
        val_accuracy=0.9, val_accuracy_active=0.8, val_count=64))
    back = parse_message(Shadow, sh.to_bytes())
    assert back.detail.refused == "v3" and back.detail.val_accuracy == 0.9 and back.detail.skipped == sh.detail.skipped
    assert b'"detail":{"agent":"box-1"' in sh.to_bytes()  # the same JSON place as before: detail.agent
    for bad in (b'{"v":1,"version":"v1","detail":{"agnet":"x"}}',  # typo: refused, not ignored
                b'{"v":1,"version":"v1","detail":{"val_accuracy":1.5}}',
                b'{"v":1,"version":"v1","detail":{"refused":"../v0"}}'):
        with pytest.raises(MalformedMessage):
            parse_message(Shadow, bad)


def test_agent_events_are_typed_and_keep_the_wire_names() -> None:
    ev = AgentEvent(kind=EventKind.ERROR, detail=EventDetail.model_validate({"while": "task", "error": "boom"}))
    wire = ev.to_bytes()
    assert b'"while":"task"' in wire and b"null" not in wire
    assert parse_message(AgentEvent, wire).detail.during == "task"
    with pytest.raises(MalformedMessage):
        parse_message(AgentEvent, b'{"v":1,"kind":"rebooted","detail":{}}')


def test_telemetry_gpu_entries_and_training_state_are_typed() -> None:
    t = parse_message(Telemetry, b'{"v":1,"at":1,"gpu":[{"index":0,"util_percent":12.5}],'
                                 b'"training":{"state":"running","step":3}}')
    assert t.gpu[0].util_percent == 12.5 and t.training["state"] is TrainingState.RUNNING
    for bad in (b'{"v":1,"gpu":[{"index":0,"fan_rpm":3}]}', b'{"v":1,"training":{"state":"dancing"}}'):
        with pytest.raises(MalformedMessage):
            parse_message(Telemetry, bad)


@pytest.mark.parametrize("bad", [".", "..", "abc\n", "a/b", "a+b", "", "x" * 65])
def test_one_identifier_rule_everywhere(bad: str) -> None:
    assert not is_identifier(bad)
    with pytest.raises(UnknownTopic) as info:
        validate_id(bad)
    assert info.value.reason == "illegal_id"
    with pytest.raises(MalformedMessage):
        parse_message(ModelRequest, ModelRequest.model_construct(version=bad).model_dump_json().encode())
    assert is_identifier("box-01.a_b") and validate_id("v12") == "v12"


# -- preprocessing steps and the profile's training section ---------------------------------------------
def test_manifest_preprocessing_is_typed_and_round_trips() -> None:
    steps = find_profile("xray-cxr-28").preprocessing
    assert steps and all(s.op in OPS for s in steps)
    m = Manifest(version="v1", architecture=Architecture(name="small_cnn"), classes=["a", "b"],
                 input=InputSpec(channels=1, height=28, width=28), preprocessing=list(steps), tensors=[],
                 tensor_hash="0" * 64)
    back = Manifest.model_validate_json(m.to_bytes())
    assert back.preprocessing == list(steps) and isinstance(back.preprocessing[0], type(steps[0]))
    assert back.canonical_bytes() == m.canonical_bytes()
    for bad in ([{"op": "sharpen"}], [{"op": "resize", "height": 28}], [{"op": "window", "gamma": 2}]):
        with pytest.raises(ValueError):
            Manifest.model_validate({**m.model_dump(mode="json"), "preprocessing": bad})
    assert parse_steps([{"op": "resize", "height": 32, "width": 32}]) == [Resize(height=32, width=32)]


def test_profile_training_section_is_the_task_config_plus_box_settings() -> None:
    assert issubclass(TrainingSection, TrainingConfig)
    section = TrainingSection(lr=0.05, qat=True)
    assert section.momentum == TrainingConfig().momentum and section.qat
    as_task = TrainingConfig.model_validate(section.model_dump(exclude={"qat", "threads"}))
    assert as_task.lr == 0.05
    with pytest.raises(ProfileError, match=r"training\.lr"):
        parse_profile("name: x\nmodality: DX\nmodel: {classes: [a, b]}\ntraining: {lr: 0}\n")
