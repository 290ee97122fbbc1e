"""Each preprocessing step on its own, on DICOM files pydicom ships and on the shared PneumoniaMNIST,
and the promise that training and inference see the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from test_api_helpers import PROFILE, dicom_file, jpeg_bytes, png_bytes

from firmware.profile import InputSection
from learning import transforms as T
from learning.dicom import Image, ImageRejected, decode, decode_dataset, image_from_array

ANY = InputSection(channels=1, modalities=[])


def dicom(name: str) -> Image:
    return decode(Path(dicom_file(name)).read_bytes(), "application/dicom", ANY)


def test_rescale_is_the_modality_lut() -> None:
    img = dicom("CT_small.dcm")
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    out = T.dicom_rescale()(img)
    np.testing.assert_allclose(out.pixels[0, :, :, 0], apply_modality_lut(ds.pixel_array, ds))
    assert float(ds.RescaleIntercept) == -1024 and out.pixels.min() < 0  # Hounsfield units
    assert out.value_range == (-32768 - 1024, 32767 - 1024)


def test_window_from_the_file_uses_its_voi_lut() -> None:
    img = dicom("MR_small.dcm")  # WindowCenter 600, WindowWidth 1600
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    out = T.window()(T.dicom_rescale()(img))
    voi = apply_voi_lut(ds.pixel_array.astype(np.float32), ds)
    lo, hi = -(2**15), 2**15 - 1  # pydicom's windowing output range for signed 16-bit
    np.testing.assert_allclose(out.pixels[0, :, :, 0], (voi - lo) / (hi - lo), atol=1e-6)
    assert out.unit and out.pixels.min() >= 0.0 and out.pixels.max() <= 1.0


def test_window_explicit_center_width_and_minmax_fallback() -> None:
    ramp = np.arange(0, 200, dtype=np.int16).reshape(10, 20)
    img = Image(pixels=ramp[None, :, :, None], photometric="MONOCHROME2", source="dicom")
    out = T.window(center=100, width=100)(img).pixels[0, :, :, 0]
    np.testing.assert_allclose(out, np.clip((ramp - 50) / 100, 0, 1))
    mm = T.window()(img).pixels[0, :, :, 0]  # no VOI in the (absent) dataset: min-max
    np.testing.assert_allclose(mm, ramp / 199, atol=1e-6)


def test_png_pixels_are_presentation_values_window_leaves_them() -> None:
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8)
    img = decode(png_bytes(arr), "image/png", ANY)
    assert T.window()(img) is img


def test_monochrome1_is_inverted_after_the_voi_lut() -> None:
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    steps = [{"op": "dicom_rescale"}, {"op": "invert_monochrome1"}, {"op": "window"}]
    mono2 = T.build_pipeline(steps)(decode_dataset(ds, ANY))
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = T.build_pipeline(steps)(decode_dataset(ds, ANY))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # invert listed after window acts at once, with the same result
    ds2 = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds2.PhotometricInterpretation = "MONOCHROME1"
    late = T.build_pipeline([{"op": "dicom_rescale"}, {"op": "window"}, {"op": "invert_monochrome1"}])
    np.testing.assert_allclose(late(decode_dataset(ds2, ANY)), mono1, atol=1e-6)


def test_select_frame_middle_index_and_refusals() -> None:
    img = dicom("rtdose.dcm")  # 15 frames
    frames = pydicom.dcmread(dicom_file("rtdose.dcm")).pixel_array
    assert img.frames == 15
    np.testing.assert_array_equal(T.select_frame()(img).pixels[0, :, :, 0], frames[7])
    np.testing.assert_array_equal(T.select_frame(3)(img).pixels[0, :, :, 0], frames[3])
    np.testing.assert_array_equal(T.select_frame(-1)(img).pixels[0, :, :, 0], frames[14])
    with pytest.raises(ImageRejected) as e:
        T.select_frame(15)(img)
    assert e.value.reason == "frame_out_of_range"
    with pytest.raises(ImageRejected) as e:
        T.build_pipeline([{"op": "scale_to_unit"}])(img)
    assert e.value.reason == "multi_frame"


def test_ybr_is_rgb_after_decoding_and_grey_uses_bt601_luma() -> None:
    ybr = dicom("SC_ybr_full_422_uncompressed.dcm")
    rgb = dicom("SC_rgb_rle.dcm")  # the same test pattern, stored as RGB
    assert ybr.photometric == "RGB" and ybr.channels == 3
    assert np.abs(ybr.pixels.astype(int) - rgb.pixels.astype(int)).max() <= 8
    grey = T.to_grayscale()(rgb)
    expected = rgb.pixels[..., 0] * 0.299 + rgb.pixels[..., 1] * 0.587 + rgb.pixels[..., 2] * 0.114
    np.testing.assert_allclose(grey.pixels[..., 0], expected, rtol=1e-5)
    back = T.to_rgb()(grey)
    assert back.channels == 3 and np.array_equal(back.pixels[..., 0], back.pixels[..., 2])


def test_resize_scale_normalize() -> None:
    img = image_from_array(np.full((64, 48), 200, dtype=np.uint8))
    out = T.resize(28, 28)(img)
    assert out.pixels.shape == (1, 28, 28, 1)
    np.testing.assert_allclose(out.pixels, 200.0, atol=1e-3)
    unit = T.scale_to_unit()(out)
    np.testing.assert_allclose(unit.pixels, 200 / 255, atol=1e-5)
    norm = T.normalize([0.5], [0.25])(unit)
    np.testing.assert_allclose(norm.pixels, (200 / 255 - 0.5) / 0.25, atol=1e-4)
    with pytest.raises(ImageRejected) as e:
        T.normalize([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])(unit)
    assert e.value.reason == "wrong_channels"
    sixteen = decode(png_bytes(np.full((8, 8), 65535, dtype=np.uint16)), "image/png", ANY)
    np.testing.assert_allclose(T.scale_to_unit()(sixteen).pixels, 1.0)


def test_manifest_dicts_build_the_same_pipeline_as_profile_steps() -> None:
    img = dicom("CT_small.dcm")
    a = T.build_pipeline(PROFILE.preprocessing)(img)
    b = T.build_pipeline([s.model_dump() for s in PROFILE.preprocessing])(img)
    assert a.shape == (1, 28, 28) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        T.build_pipeline([{"op": "sharpen"}])


def test_training_and_inference_see_the_same_pixels(pneumonia_npz: Path) -> None:
    images = np.load(pneumonia_npz)["test_images"][:16]
    pipe = T.build_pipeline(PROFILE.preprocessing)
    for arr in images:
        train = pipe(image_from_array(arr))
        served = pipe(decode(png_bytes(arr), "image/png", PROFILE.input))
        np.testing.assert_array_equal(train, served)
        lossy = pipe(decode(jpeg_bytes(arr), "image/jpeg", PROFILE.input))
        assert np.abs(lossy - train).mean() < 0.05  # JPEG is lossy; same steps, near pixels
