"""The decoders that read bytes from the network or a scanner, as fuzz targets (issue 15 item 15).

Each :class:`Target` takes one input (bytes) and either decodes it or refuses it with a
:class:`protocol.errors.FedscanError` subclass carrying a ``Reason``: the *typed refusal*. Any
other exception is a finding. Targets and their seed corpora (valid inputs that mutations start
from) are shared by the property tests (``tests/test_fuzz_decoders.py``, hypothesis) and the
fuzz benchmark (``bench/fuzz.py``, seeded random mutations with a time budget).

Targets:

* ``frame``: an update frame as the coordinator receives it (envelope, header, checksum, codec,
  shape and finiteness checks: ``protocol.frame.decode_update``);
* ``frame_header``: the frame's JSON header, packed with a valid payload (reaches every header
  field check, which the checksum hides from byte mutations of a whole frame);
* ``model_frame``: a global-model frame as an agent receives it (``decode_model``, XOR downlink);
* ``chunk``: one chunk message, parsed and fed to a bounded per-sender reassembler, the blob
  checked when complete (``protocol.chunks``, ``protocol.reassembly``);
* ``manifest``: a model manifest, parsed and its Ed25519 signature verified (``protocol.manifest``,
  ``protocol.signing``);
* ``codec``: an uplink codec payload, decoded by one of several pipelines (the first byte picks
  it; no frame checksum in front, so every stage's decoder is reached);
* ``codec_spec``: a codec pipeline spec string (``parse_codec``'s grammar);
* ``dicom``: a DICOM Part 10 file through the edge box's intake: decode (``learning.dicom``) and the
  device profile's preprocessing (``learning.transforms``), as the diagnosis API and the C-STORE
  listener run it.
"""

from __future__ import annotations

import io
import json
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from edge_agent.deid import deidentify
from firmware.profile import find_profile
from learning.dicom import decode as decode_image
from learning.transforms import Pipeline, build_pipeline
from protocol import envelope
from protocol.chunks import parse_chunk, split
from protocol.codec import ErrorFeedbackState, Tensors, parse_codec, specs_of
from protocol.errors import FedscanError
from protocol.frame import FRAME_FORMAT, FRAME_MAGIC, decode_model, encode_model, encode_update, read_header
from protocol.frame import decode_update as decode_update_frame
from protocol.manifest import Architecture, InputSpec, Manifest, TensorEntry, parse_manifest
from protocol.reassembly import Reassembler, ReassemblyLimits
from protocol.signing import SigningKey, TrustStore
from protocol.tensors import tensor_hash

CODECS = ("raw", "raw|zstd", "delta|topk:0.1|ef|q:8|zstd", "delta|q:4:block=16", "delta|sign|zstd",
          "delta|topk:0.2:global|ef|sign")
"""Uplink pipelines the ``codec`` target decodes with (input byte 0 picks one)."""


@dataclass(frozen=True)
class Target:
    """One decoder under fuzz: ``run(data)`` returns, or raises a ``FedscanError`` (a typed refusal)."""

    name: str
    seeds: tuple[bytes, ...]
    run: Callable[[bytes], object]


@dataclass(frozen=True)
class Outcome:
    """What one input did: ``accepted``, ``refused`` (with its reason) or ``failed`` (with a signature)."""

    kind: str
    detail: str


def _tensors() -> tuple[Tensors, Tensors]:
    rng = np.random.default_rng(15)
    new = {"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
           "conv.bias": rng.standard_normal(4).astype(np.float32),
           "fc.weight": rng.standard_normal((2, 4)).astype(np.float32)}
    base = {k: (v * 0.9).astype(np.float32) for k, v in new.items()}
    return new, base


NEW, BASE = _tensors()
SPECS = specs_of(BASE)


@cache
def _frames() -> tuple[bytes, ...]:
    return tuple(encode_update(NEW, agent_id="site-1", round_id=3, base_version="v2", sample_count=40, codec=c,
                               base=BASE, metrics={"train_loss": 0.5}, state=ErrorFeedbackState(), seed=1,
                               update_id=f"u{i}")
                 for i, c in enumerate(("raw", "delta|topk:0.1|ef|q:8|zstd", "delta|q:4:block=16")))


def run_frame(data: bytes) -> object:
    """Decode ``data`` as an update frame against the fuzz model's shapes and base."""
    return decode_update_frame(data, expected=SPECS, base=BASE, max_update_norm=1e3)


def _valid_payload() -> bytes:
    return read_header(_frames()[0])[1]


def run_frame_header(data: bytes) -> object:
    """Pack ``data`` as the JSON header of a frame around a valid raw payload; decode it."""
    return run_frame(envelope.pack(FRAME_MAGIC, FRAME_FORMAT, data, _valid_payload()))


def _model_frames() -> tuple[bytes, ...]:
    return (encode_model(NEW, version="v3", round_id=3), encode_model(NEW, version="v3", round_id=3, base=BASE,
                                                                       base_version="v2"))


def run_model_frame(data: bytes) -> object:
    """Decode ``data`` as a global-model frame whose manifest names the fuzz model's hash."""
    return decode_model(data, expected=SPECS, expected_hash=tensor_hash(NEW), base=BASE)


def run_chunk(data: bytes) -> object:
    """Parse one chunk and add it to a small bounded reassembler; check the blob when complete."""
    chunk = parse_chunk(data)
    r = Reassembler(ReassemblyLimits(max_transfer_bytes=1 << 16, max_bytes_per_sender=1 << 17,
                                     max_transfers_per_sender=4, max_total_bytes=1 << 18)).add("site-1", chunk)
    return r.blob() if r.complete else r


FUZZ_KEY = SigningKey.generate()


@cache
def _trust() -> TrustStore:
    trust = TrustStore()
    trust.trust(FUZZ_KEY.public_raw)
    return trust


def _manifest() -> bytes:
    m = Manifest(version="v3", parent="v2", architecture=Architecture(name="small_cnn", kwargs={"width": 8}),
                 classes=["normal", "pneumonia"], input=InputSpec(channels=1, height=28, width=28),
                 tensors=[TensorEntry(name=k, shape=v.shape) for k, v in NEW.items()], tensor_hash=tensor_hash(NEW))
    return FUZZ_KEY.sign_manifest(m).to_bytes()


def run_manifest(data: bytes) -> object:
    """Parse ``data`` as a manifest and verify its signature against the fuzz trust store."""
    return _trust().verify_manifest(parse_manifest(data), profile="xray-cxr-28")


def _codec_payloads() -> tuple[bytes, ...]:
    out = []
    for i, spec in enumerate(CODECS):
        p = parse_codec(spec)
        out.append(bytes([i]) + p.encode(NEW, base=BASE, state=ErrorFeedbackState() if p.needs_state else None, seed=3))
    return tuple(out)


def run_codec(data: bytes) -> object:
    """Decode ``data[1:]`` with pipeline ``CODECS[data[0] % len(CODECS)]`` (an empty input picks ``raw``)."""
    spec = CODECS[data[0] % len(CODECS)] if data else CODECS[0]
    return parse_codec(spec).decode(data[1:], specs=SPECS, base=BASE)


def run_codec_spec(data: bytes) -> object:
    """Parse ``data`` (UTF-8, undecodable bytes replaced) as a codec pipeline spec."""
    return parse_codec(data.decode("utf-8", errors="replace"))


PROFILE = find_profile("xray-cxr-28")
ACCEPT = PROFILE.input.model_copy(update={"modalities": ["DX", "CR", "OT", "CT", "MR"]})
"""The stock chest X-ray box's input limits, widened to the modalities of pydicom's sample files."""


@cache
def _pipeline() -> Pipeline:
    return build_pipeline(list(PROFILE.preprocessing))


def _dicom_seeds() -> tuple[bytes, ...]:
    from pydicom.data import get_testdata_file  # pydicom's bundled sample files (no download)

    names = ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm")
    return tuple(Path(str(get_testdata_file(n))).read_bytes() for n in names)


def run_dicom(data: bytes) -> object:
    """Decode ``data`` as a DICOM file under the box's limits, run the profile's preprocessing, and
    de-identify and write the dataset as the local store keeps it (``edge_agent.store``)."""
    img = decode_image(data, "application/dicom", ACCEPT)
    x = _pipeline()(img)
    if img.dataset is not None:
        deidentify(img.dataset)
        img.dataset.save_as(io.BytesIO(), enforce_file_format=True)
    return x


def targets() -> dict[str, Target]:
    """Every target with its seed corpus, by name."""
    frames = _frames()
    header = read_header(frames[0])[0].model_dump_json().encode()
    return {t.name: t for t in (
        Target("frame", frames, run_frame),
        Target("frame_header", (header,), run_frame_header),
        Target("model_frame", _model_frames(), run_model_frame),
        Target("chunk", tuple(split(frames[1], "transfer-1", 96)[:3]) + tuple(split(b"x" * 10, "t2", 64)), run_chunk),
        Target("manifest", (_manifest(),), run_manifest),
        Target("codec", _codec_payloads(), run_codec),
        Target("codec_spec", tuple(c.encode() for c in CODECS), run_codec_spec),
        Target("dicom", _dicom_seeds(), run_dicom),
    )}


def outcome(target: Target, data: bytes) -> Outcome:
    """Run ``target`` on ``data``; a failure's detail names the exception type and where it was raised."""
    try:
        target.run(data)
    except FedscanError as exc:
        return Outcome("refused", str(exc.reason))
    except Exception as exc:  # any other exception is exactly what a fuzzer reports
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "site-packages" not in f.filename),
                     "?")
        return Outcome("failed", f"{type(exc).__name__} at {where}: {str(exc)[:120]}")
    return Outcome("accepted", "")


# -- mutations -------------------------------------------------------------------------------------
MUTATIONS = ("flip", "set", "truncate", "insert", "delete", "duplicate", "splice_json")


def mutate(data: bytes, ops: Sequence[tuple[str, int, int]]) -> bytes:
    """Apply ``ops`` (name, position, value) in order; positions and values wrap to fit ``data``.

    ``flip`` xors one byte with ``value`` (1..255), ``set`` writes ``value``, ``truncate`` cuts at
    ``position``, ``insert`` puts ``value`` bytes of 0xff at ``position``, ``delete`` drops ``value``
    bytes there, ``duplicate`` repeats a slice, ``splice_json`` replaces a JSON number or string
    value with an extreme one (``value`` picks which), to reach validation past parsers.
    """
    buf = bytearray(data)
    for name, pos, value in ops:
        n = len(buf)
        p = pos % (n + 1)
        if name == "flip" and n:
            buf[p % n] ^= (value % 255) + 1
        elif name == "set" and n:
            buf[p % n] = value % 256
        elif name == "truncate":
            del buf[p:]
        elif name == "insert":
            buf[p:p] = b"\xff" * (value % 64 + 1)
        elif name == "delete":
            del buf[p:p + value % 64 + 1]
        elif name == "duplicate":
            buf[p:p] = buf[p:p + value % 256 + 1]
        elif name == "splice_json":
            buf = bytearray(_splice_json(bytes(buf), pos, value))
    return bytes(buf)


EXTREMES: tuple[object, ...] = (-1, 0, 2**31, 2**63, 10**400, -1e308, "NaN", "", "a" * 300, "../..", [], {}, None, True,
                                [2**40, 2**40])


def _splice_json(data: bytes, pos: int, value: int) -> bytes:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return data
    paths = list(_leaves(doc, ()))
    if not paths:
        return data
    path = paths[pos % len(paths)]
    if not path:
        return json.dumps(EXTREMES[value % len(EXTREMES)]).encode()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = EXTREMES[value % len(EXTREMES)]
    return json.dumps(doc).encode()


def _leaves(node: object, path: tuple[object, ...]) -> list[tuple[object, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))] or ([path] if path else [])
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))] or ([path] if path else [])
    return [path]
