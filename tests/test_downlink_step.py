"""The compressed, bit-exact downlink (issue 19 item 7), unit level: a version published as a lossy
step from its parent rebuilds bit for bit on a box that holds the parent, and only there; error
feedback on the coordinator carries what a step left out; artifact patches are exact and refuse
what does not fit; the validation batch travels by reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.model_repo import ModelRepository
from coordinator.rounds import RoundSettings
from firmware.profile import ProfileError, parse_profile
from protocol.codec import CodecError, ErrorFeedbackState, TensorSpec
from protocol.codec.patch import patch_decode, patch_encode
from protocol.errors import FrameError, ManifestError, Reason
from protocol.frame import decode_model, encode_model_step
from protocol.tensors import tensor_hash
from protocol.validation_batch import by_reference, decode_batch, encode_batch, is_inline

STEP = "delta|topk:0.05|ef|q:4|zstd"


def _model(rng: np.random.Generator, shapes: Sequence[tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {f"t{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}


def _specs(t: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape)) for k, v in t.items()]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), codec=st.sampled_from([STEP, "delta|topk:0.1|ef|q:2|zstd", "delta|q:4|ef|zstd",
                                                               "delta|topk:0.02|q:8|ef|zstd"]),
       shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 9)), min_size=1, max_size=4))
def test_a_step_rebuilds_the_published_version_bit_for_bit(seed: int, codec: str, shapes: list[tuple[int, int]]
                                                          ) -> None:
    rng = np.random.default_rng(seed)
    base = _model(rng, shapes)
    new = {k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in base.items()}
    frame, published = encode_model_step(new, version="v2", round_id=2, base=base, base_version="v1", codec=codec,
                                         state=ErrorFeedbackState(), seed=seed)
    header, rebuilt = decode_model(frame, expected=_specs(base), expected_hash=tensor_hash(published),
                                   base={k: v.copy() for k, v in base.items()})
    assert header.kind == "delta" and header.base_version == "v1" and header.codec == codec
    for k in base:
        assert rebuilt[k].tobytes() == published[k].tobytes()  # bit for bit, not approximately


def test_a_step_applied_to_another_version_is_refused_by_the_hash() -> None:
    rng = np.random.default_rng(0)
    base = _model(rng, [(16, 8), (8,)])
    new = {k: v + 0.05 for k, v in base.items()}
    frame, published = encode_model_step(new, version="v2", round_id=2, base=base, base_version="v1", codec=STEP,
                                         state=ErrorFeedbackState())
    older = {k: v - 0.01 for k, v in base.items()}
    with pytest.raises(FrameError) as info:
        decode_model(frame, expected=_specs(base), expected_hash=tensor_hash(published), base=older)
    assert info.value.reason == Reason.HASH_MISMATCH
    with pytest.raises(FrameError) as info:
        decode_model(frame, expected=_specs(base), expected_hash=tensor_hash(published))
    assert info.value.reason == Reason.MISSING_BASE
    with pytest.raises(FrameError) as info:  # a lossy codec without delta is no model step
        encode_model_step(new, version="v2", round_id=2, base=base, base_version="v1", codec="topk:0.1|zstd",
                          state=None)
    assert info.value.reason == Reason.UNKNOWN_CODEC


@pytest.mark.parametrize("codec", ["delta|topk:0.05|q:4|ef|zstd", "delta|topk:0.05|ef|q:4|zstd"])
def test_error_feedback_on_the_coordinator_keeps_the_published_chain_near_the_true_one(codec: str) -> None:
    """Steps keep 5% of the entries; over 30 rounds the published model stays near the true
    aggregate chain: with ``q|ef`` within the current residual (telescoping: everything left out
    is fed back), with ``ef|q`` within it plus the unbiased quantization noise; both far closer
    than dropping the rest (no ef) leaves it."""
    rng = np.random.default_rng(1)
    true = _model(rng, [(64, 32)])
    published = {k: v.copy() for k, v in true.items()}
    no_ef = {k: v.copy() for k, v in true.items()}
    state = ErrorFeedbackState()
    for r in range(1, 31):
        drift = {k: rng.normal(scale=0.01, size=v.shape).astype(np.float32) + 0.002 for k, v in true.items()}
        true = {k: true[k] + drift[k] for k in true}
        target = {k: published[k] + drift[k] for k in true}  # the coordinator aggregates from what it published
        _, published = encode_model_step(target, version=f"v{r}", round_id=r, base=published,
                                         base_version=f"v{r - 1}", codec=codec, state=state, seed=r)
        _, no_ef = encode_model_step({k: no_ef[k] + drift[k] for k in true}, version=f"v{r}", round_id=r, base=no_ef,
                                     base_version=f"v{r - 1}", codec="delta|topk:0.05|q:4|zstd", state=None, seed=r)
    gap = np.abs(true["t0"] - published["t0"])
    residual = np.abs(state.residual("t0"))  # type: ignore[arg-type]
    if codec.endswith("q:4|ef|zstd"):
        assert float((gap - residual).max()) <= 1e-4  # only float32 rounding over 30 additions
    assert float(np.abs(true["t0"] - no_ef["t0"]).mean()) > 3 * float(gap.mean())


def test_the_residual_is_saved_with_the_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from protocol.manifest import Architecture, InputSpec, Manifest, TensorEntry

    rng = np.random.default_rng(2)
    base = _model(rng, [(10, 10)])
    state = ErrorFeedbackState()
    frame, published = encode_model_step({k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32)
                                          for k, v in base.items()}, version="v1", round_id=1, base=base,
                                         base_version="v0", codec=STEP, state=state)
    m = Manifest(version="v1", parent="v0", architecture=Architecture(name="x"), classes=["a", "b"],
                 input=InputSpec(channels=1, height=8, width=8),
                 tensors=[TensorEntry(name=k, shape=v.shape) for k, v in published.items()],
                 tensor_hash=tensor_hash(published))
    repo = ModelRepository(tmp_path)
    repo.save(m, published, {}, step=frame, downlink_state=state)
    assert repo.step_frame("v1") == frame
    saved, kept = repo.downlink_state("v1").residual("t0"), state.residual("t0")
    assert saved is not None and kept is not None and np.array_equal(saved, kept)
    assert repo.step_frame("v0") is None and len(repo.downlink_state("v0")) == 0


def test_downlink_codec_must_be_a_delta_pipeline() -> None:
    assert RoundSettings(downlink_codec=STEP).downlink_codec == STEP
    with pytest.raises(CodecError):
        RoundSettings(downlink_codec="topk:0.1|q:4|zstd")
    with pytest.raises(CodecError):
        RoundSettings(downlink_codec="delta|bogus")
    def profile(downlink: str) -> str:
        return ("name: p\nmodality: xray\nmodel: {architecture: small_cnn, classes: [a, b]}\n"
                f"compression:\n  downlink: '{downlink}'\n")

    assert parse_profile(profile("xor|zstd")).compression.downlink == "xor|zstd"  # type: ignore[union-attr]
    assert parse_profile(profile(STEP)).compression.downlink == STEP  # type: ignore[union-attr]
    with pytest.raises(ProfileError, match="downlink"):
        parse_profile(profile("q:4|zstd"))


def test_artifact_patch_is_exact_and_small_when_little_changed() -> None:
    rng = np.random.default_rng(3)
    old = rng.integers(0, 256, size=200_000, dtype=np.uint8).tobytes()
    arr = bytearray(old)
    for i in rng.choice(len(arr), size=2_000, replace=False):  # 1% of the bytes change
        arr[i] ^= 0x5A
    new = bytes(arr)
    patch = patch_encode(new, old)
    assert patch_decode(patch, old, max_output=len(new)) == new
    assert len(patch) < len(new) // 10  # random bytes: only a patch can be this small
    whole = patch_encode(new, None)
    assert patch_decode(whole, None, max_output=len(new)) == new and len(whole) > len(new) // 2


def test_artifact_patch_refusals() -> None:
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, size=10_000, dtype=np.uint8).tobytes()
    new = old[:5000] + bytes(10) + old[5010:]
    patch = patch_encode(new, old)
    assert len(patch) < 1000  # it refers to the base
    cases = [
        (lambda: patch_decode(patch, None, max_output=len(new)), Reason.MISSING_BASE),
        (lambda: patch_decode(b"\x07" + patch[1:], old, max_output=len(new)), Reason.BAD_FRAME),
        (lambda: patch_decode(b"", old, max_output=len(new)), Reason.TRUNCATED),
        (lambda: patch_decode(patch, old, max_output=len(new) - 1), Reason.DECOMPRESSION_BOMB),
        (lambda: patch_decode(patch, old[::-1], max_output=len(new)), Reason.CORRUPT),  # checksum: wrong base
    ]
    for call, reason in cases:
        with pytest.raises(CodecError) as info:
            call()
        assert info.value.reason == reason


def test_validation_batch_by_reference_checks_its_hash() -> None:
    x = np.random.default_rng(4).normal(size=(8, 1, 28, 28)).astype(np.float32)
    y = np.array([0, 1] * 4)
    inline = encode_batch(x, y)
    ref, raw = by_reference(inline)
    assert is_inline(inline) and not is_inline(ref)
    assert ref.uri == f"validation/{inline.sha256}.npz" and ref.sha256 == inline.sha256 and len(ref.uri) < 100
    x2, y2 = decode_batch(ref, channels=1, height=28, width=28, classes=2, data=raw)
    assert np.allclose(x2, x, atol=1e-2) and (y2 == y).all()
    for data in (None, raw[:-1], raw + b"\0"):
        with pytest.raises(ManifestError) as info:
            decode_batch(ref, channels=1, height=28, width=28, classes=2, data=data)
        assert info.value.reason == Reason.BAD_VALIDATION_BATCH


def test_auto_downlink_is_exact_with_a_lossless_uplink_and_steps_with_a_lossy_one() -> None:
    from coordinator.rounds.settings import DEFAULT_DOWNLINK_STEP, downlink_step_codec
    from firmware.profile import find_profile

    profile = find_profile("xray-cxr-28")
    # the shipped default is exact (steps cost accuracy: opt-in), whatever the uplink codec
    assert profile.compression is not None and profile.compression.downlink == "xor|zstd"
    assert downlink_step_codec(None, profile, "raw") is None
    assert downlink_step_codec(None, profile, "delta|topk:0.05|ef|q:2|zstd") is None
    auto = profile.model_copy(update={"compression": profile.compression.model_copy(update={"downlink": "auto"})})
    assert downlink_step_codec(None, auto, "raw") is None
    assert downlink_step_codec(None, auto, "raw|zstd") is None
    assert downlink_step_codec(None, auto, "delta|topk:0.05|ef|q:2|zstd") == DEFAULT_DOWNLINK_STEP
    assert downlink_step_codec("xor|zstd", profile, "delta|topk:0.05|ef|q:2|zstd") is None
    assert downlink_step_codec(STEP, profile, "raw") == STEP
    assert downlink_step_codec("auto", profile, "delta|q:8|zstd") == DEFAULT_DOWNLINK_STEP
