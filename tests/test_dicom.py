"""Decoders: what they accept, and every bad input refused with a reason code (and the HTTP status the API maps it to)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_api_helpers import ACCEPT, PROFILE, dicom_file, jpeg_bytes, png_bytes

from edge_agent.api.errors import http_status
from learning.dicom import ImageRejected, decode, format_of


def dcm(name: str) -> bytes:
    return Path(dicom_file(name)).read_bytes()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (with a valid CRC) claims ``width`` x ``height``: a bomb header."""
    raw = png_bytes(np.zeros((1, 1), dtype=np.uint8))
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return raw[:16] + ihdr + crc + raw[33:]


def rejected(data: bytes, ctype: str | None, accept=ACCEPT) -> ImageRejected:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageRejected) as e:
        decode(data, ctype, accept)
    return e.value


def test_accepts_png_jpeg_and_dicom_including_jpeg2000() -> None:
    arr = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    assert decode(png_bytes(arr), "image/png", ACCEPT).pixels.shape == (1, 28, 28, 1)
    assert decode(jpeg_bytes(arr), "image/jpeg; charset=binary", ACCEPT).source == "jpeg"
    rgb = decode(png_bytes(np.zeros((5, 7, 3), dtype=np.uint8)), "image/png", ACCEPT)
    assert rgb.pixels.shape == (1, 5, 7, 3) and rgb.photometric == "RGB"
    ct = decode(dcm("CT_small.dcm"), "application/dicom", ACCEPT)
    assert ct.modality == "CT" and ct.pixels.shape == (1, 128, 128, 1)
    j2k = decode(dcm("MR_small_jp2klossless.dcm"), "application/dicom", ACCEPT)
    plain = decode(dcm("MR_small.dcm"), "application/dicom", ACCEPT)
    np.testing.assert_array_equal(j2k.pixels, plain.pixels)  # lossless JPEG 2000 via pylibjpeg-openjpeg
    rle = decode(dcm("SC_rgb_rle.dcm"), "application/dicom", ACCEPT)
    assert rle.photometric == "RGB" and rle.channels == 3


@pytest.mark.parametrize(
    ("data", "ctype", "status", "reason"),
    [
        (b"hello", "text/plain", 415, "unsupported_content_type"),
        (b"hello", None, 415, "unsupported_content_type"),
        (b"not a png at all", "image/png", 400, "corrupt_image"),
        (b"\xff\xd8\xff\xe0 broken", "image/jpeg", 400, "corrupt_image"),
        (b"plain text, no preamble" * 10, "application/dicom", 400, "not_dicom"),
        (b"", "image/png", 400, "empty_body"),
    ],
    ids=["text", "no-type", "png-garbage", "jpeg-garbage", "dicom-garbage", "empty"],
)
def test_refused_bytes(data: bytes, ctype: str | None, status: int, reason: str) -> None:
    e = rejected(data, ctype)
    assert (http_status(e), e.reason) == (status, reason)


def test_truncated_png_is_corrupt() -> None:
    full = png_bytes((np.random.default_rng(0).integers(0, 255, (64, 64))).astype(np.uint8))
    e = rejected(full[: len(full) // 2], "image/png")
    assert (http_status(e), e.reason) == (400, "corrupt_image")


def test_png_declared_as_jpeg_is_refused() -> None:
    e = rejected(png_bytes(np.zeros((8, 8), dtype=np.uint8)), "image/jpeg")
    assert (http_status(e), e.reason) == (400, "corrupt_image")


def test_truncated_dicom() -> None:
    e = rejected(dcm("MR_truncated.dcm"), "application/dicom")
    assert (http_status(e), e.reason) == (422, "truncated_dicom")


def test_dicom_without_pixel_data() -> None:
    e = rejected(dcm("rtplan.dcm"), "application/dicom")
    assert (http_status(e), e.reason) == (422, "no_pixel_data")
    assert "RT Plan" in e.message


def test_transfer_syntax_without_a_decoder() -> None:
    # JPEG-LS needs pyjpegls / pylibjpeg-libjpeg / gdcm: none is installed on the box
    e = rejected(dcm("MR_small_jpeg_ls_lossless.dcm"), "application/dicom")
    assert (http_status(e), e.reason) == (415, "unsupported_transfer_syntax")
    assert "JPEG-LS" in e.message


def test_over_the_byte_limit() -> None:
    small = ACCEPT.model_copy(update={"max_bytes": 4096})
    e = rejected(dcm("CT_small.dcm"), "application/dicom", small)
    assert (http_status(e), e.reason) == (413, "too_large")


def test_decompression_bomb_refused_from_the_header() -> None:
    e = rejected(png_claiming(40_000, 40_000), "image/png")  # 1.6 G pixels claimed, 1 stored
    assert (http_status(e), e.reason) == (413, "too_many_pixels")
    few = ACCEPT.model_copy(update={"max_pixels": 100})
    e = rejected(dcm("CT_small.dcm"), "application/dicom", few)  # 128x128 > 100
    assert (http_status(e), e.reason) == (413, "too_many_pixels")


def test_wrong_number_of_channels() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 128  # translucent alpha: no meaningful 1- or 3-channel picture
    e = rejected(png_bytes(rgba, mode="RGBA"), "image/png")
    assert (http_status(e), e.reason) == (422, "wrong_channels")
    rgba[..., 3] = 255  # opaque alpha is dropped
    assert decode(png_bytes(rgba, mode="RGBA"), "image/png", ACCEPT).channels == 3


def test_modality_not_accepted_by_the_stock_profile() -> None:
    e = rejected(dcm("MR_small.dcm"), "application/dicom", PROFILE.input)  # DX, CR, OT only
    assert (http_status(e), e.reason) == (422, "modality_not_accepted")
    assert "'MR'" in e.message


def test_format_not_accepted_by_profile() -> None:
    png_only = ACCEPT.model_copy(update={"formats": ["png"]})
    e = rejected(dcm("CT_small.dcm"), "application/dicom", png_only)
    assert (http_status(e), e.reason) == (415, "format_not_accepted")


def test_content_type_parsing() -> None:
    assert format_of("Application/DICOM") == "dicom"
    assert format_of("image/png; q=1") == "png"


def test_no_identifier_in_refusal_messages() -> None:
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    e = rejected(dcm("MR_small.dcm"), "application/dicom", PROFILE.input)
    assert str(ds.PatientName) not in str(e) and str(ds.PatientID) not in str(e)


def test_decoder_present_but_unable() -> None:
    # 12-bit JPEG Extended: Pillow's plugin exists but cannot decode 12-bit samples
    e = rejected(dcm("JPEG-lossy.dcm"), "application/dicom", ACCEPT.model_copy(update={"modalities": []}))
    assert (http_status(e), e.reason) == (415, "undecodable_pixel_data")
