"""Property tests over the decoders of untrusted bytes (issue 15 item 15): any input gives the typed refusal.

For every target of ``tools/fuzz_targets.py`` (update frame, frame header, model frame, chunk +
reassembly, manifest + signature, codec payload, codec spec, DICOM intake), hypothesis feeds
arbitrary bytes and mutations of valid inputs (bit flips, truncation, insertion, deletion,
duplication, extreme JSON values); the only allowed outcomes are a decode or a
``FedscanError`` with a reason. The inputs that found bugs here are kept as regression cases.
``bench/fuzz.py`` runs the same targets for longer and counts executions and unique failures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package
from protocol.errors import FedscanError, Reason
from protocol.manifest import parse_manifest
from tools.fuzz_targets import MUTATIONS, Target, mutate, outcome, targets

TARGETS = targets()
EXAMPLES = {"dicom": 40, "frame_header": 150}  # slower targets get fewer examples (each test stays a few seconds)

OPS = st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2**20), st.integers(0, 2**16)),
               min_size=1, max_size=4)


def _check(target: Target, data: bytes) -> None:
    got = outcome(target, data)
    assert got.kind != "failed", f"{target.name}: {got.detail} on input {data[:80]!r}"


def test_every_seed_is_accepted() -> None:
    """The corpora are valid inputs: a mutation of them starts from a decode, not from a refusal."""
    for t in TARGETS.values():
        assert t.seeds, t.name
        assert [outcome(t, s).kind for s in t.seeds] == ["accepted"] * len(t.seeds), t.name


def test_the_harness_reports_an_untyped_exception() -> None:
    """A target that raises something other than a FedscanError is a failure, never a refusal."""
    def boom(data: bytes) -> object:
        raise KeyError("x")

    assert outcome(Target("t", (b"",), boom), b"").kind == "failed"
    assert outcome(Target("t", (b"",), lambda d: parse_manifest(d)), b"{").kind == "refused"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_inputs_give_only_typed_refusals(name: str) -> None:
    target = TARGETS[name]

    @settings(max_examples=EXAMPLES.get(name, 300), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.sampled_from(target.seeds), ops=OPS)
    def check(seed: bytes, ops: list[tuple[str, int, int]]) -> None:
        _check(target, mutate(seed, ops))

    check()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_arbitrary_bytes_give_only_typed_refusals(name: str) -> None:
    target = TARGETS[name]

    @settings(max_examples=EXAMPLES.get(name, 200), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.binary(max_size=2048))
    def check(data: bytes) -> None:
        _check(target, data)

    check()


# -- what the fuzzer found (each failed before its fix) ---------------------------------------------
def _manifest_with(key: str, raw_value: str) -> bytes:
    doc = TARGETS["manifest"].seeds[0].decode()
    at = doc.index(f'"{key}":') + len(key) + 3
    end = doc.index(",", at)
    return (doc[:at] + raw_value + doc[end:]).encode()


@pytest.mark.parametrize("raw", ["1e999", '"NaN"', '"-Infinity"'])
def test_manifest_with_a_non_finite_float_is_a_bad_manifest(raw: str) -> None:
    """``created_at`` of 1e999 or "NaN" parsed as a float, then signature verification raised
    ValueError (canonical JSON cannot carry it): now refused when parsed."""
    data = _manifest_with("created_at", raw)
    assert f'"created_at":{raw}'.encode() in data
    with pytest.raises(FedscanError) as info:
        TARGETS["manifest"].run(data)
    assert info.value.reason is Reason.BAD_MANIFEST


def _dicom_seed() -> bytes:
    return TARGETS["dicom"].seeds[0]  # CT_small.dcm


def _refusal(data: bytes) -> Reason:
    with pytest.raises(FedscanError) as info:
        TARGETS["dicom"].run(data)
    return info.value.reason


def test_dicom_with_an_odd_length_numeric_value_is_corrupt() -> None:
    """pydicom's BytesLengthException (not a ValueError) escaped the decoder."""
    seed = _dicom_seed()
    at = seed.index(b"\x28\x00\x10\x00")  # (0028,0010) Rows, US, length 2
    bad = seed[:at + 6] + b"\x03\x00" + seed[at + 8:at + 11] + seed[at + 12:]  # length 3; a byte moved
    assert _refusal(bad) is Reason.CORRUPT_DICOM


def test_dicom_with_an_unknown_vr_is_corrupt() -> None:
    seed = _dicom_seed()
    at = seed.index(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR CS
    assert _refusal(seed[:at + 4] + b"Qx" + seed[at + 6:]) is Reason.CORRUPT_DICOM


def test_dicom_with_file_meta_elements_in_the_body_is_corrupt() -> None:
    """The body cannot be written as a Part 10 file: de-identified storage raised ValueError."""
    seed = _dicom_seed()
    at = seed.index(b"\x08\x00\x60\x00CS")
    assert _refusal(seed[:at] + b"\x02\x00" + seed[at + 2:]) is Reason.CORRUPT_DICOM


def test_dicom_with_a_malformed_date_is_refused_not_kept_half_deidentified() -> None:
    """dicognito cannot shift '20>70101' as a date: de-identification raised ValueError."""
    seed = _dicom_seed()
    at = seed.index(b"\x08\x00\x20\x00DA")  # (0008,0020) StudyDate
    length = int.from_bytes(seed[at + 6:at + 8], "little")
    assert length == 8
    assert _refusal(seed[:at + 8] + b"20>70101" + seed[at + 16:]) is Reason.CORRUPT_DICOM
