"""Intake that cannot exhaust the box (issue 15 item 10): big images are shrunk while their pixels
are still integers, never turned into full-size float32."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import PIL.Image

from firmware.profile import find_profile
from learning.dicom import decode, image_from_array
from learning.transforms import build_pipeline, resize, shrink_for


def _big_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(side // 64, side // 64), dtype=np.uint8)
    arr = np.kron(small, np.ones((64, 64), np.uint8))  # compresses well: a small file, many pixels
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_preprocessing_a_big_image_never_allocates_a_full_size_float_copy() -> None:
    profile = find_profile("xray-cxr-28")
    side = 4096
    data = _big_png(side)
    img = decode(data, "image/png", profile.input)
    decoded = img.pixels.nbytes  # 16 MiB of uint8
    pipeline = build_pipeline(profile.preprocessing)
    tracemalloc.start()
    try:
        x = pipeline(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    # before: window/grayscale/resize made float32 copies of the full image (4x the decoded bytes, twice)
    assert peak < decoded / 2, f"preprocessing peaked at {peak / 2**20:.1f} MiB for a {decoded / 2**20:.0f} MiB image"


def test_shrinking_first_gives_the_picture_plain_resizing_gives() -> None:
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 4096, size=(16, 16)), np.ones((40, 40))).astype(np.uint16)  # 640 x 640
    img = image_from_array(smooth[:, :, None])
    plain = resize(28, 28)(img).pixels.astype(np.float64)
    shrunk = resize(28, 28)(shrink_for(28, 28)(img))
    assert shrink_for(28, 28)(img).pixels.dtype == np.uint16  # still stored values
    assert shrink_for(28, 28)(img).pixels.shape == (1, 29, 29, 1)  # the largest whole factor (22) keeps >= 28
    a, b = shrunk.pixels.ravel().astype(np.float64), plain.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.98 and np.abs(a - b).mean() / 4095 < 0.05  # same picture, edges differ
    small = image_from_array(np.zeros((40, 40), np.uint8))
    assert shrink_for(28, 28)(small) is small  # nothing to gain below twice the target
