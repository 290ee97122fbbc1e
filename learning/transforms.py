"""Preprocessing steps from the firmware profile, each a small unit, shared by training and inference.

``build_pipeline(profile.preprocessing)`` returns a callable ``Image -> np.ndarray`` (float32,
``(channels, height, width)``); the agent's trainer and its inference service both call it, so
both see the same pixels. A step is a function ``Image -> Image`` built from its profile model:

- ``select_frame``: one frame of a multi-frame image (``"middle"`` or an index).
- ``dicom_rescale``: the DICOM Modality LUT (Rescale Slope/Intercept or LUT), ``apply_modality_lut``.
- ``invert_monochrome1``: MONOCHROME1 shows low values white; invert so that high is white.
  DICOM inverts at presentation, after the VOI LUT, so when listed before ``window`` the
  inversion takes effect where the values become presentation values in [0, 1].
- ``window``: explicit center/width, else the file's VOI LUT / window (``apply_voi_lut``), else
  min-max; the result is presentation values in [0, 1]. PNG/JPEG pixels are presentation
  values already, so without an explicit center/width they pass unchanged.
- ``to_grayscale`` (ITU-R BT.601 luma) and ``to_rgb`` (grey replicated); YBR was converted to
  RGB by the decoder.
- ``resize``: bilinear, per channel, in float. A pipeline with a resize first shrinks the stored
  pixels by the largest whole factor that keeps them at least the target size (box average, in
  their own integer type: :func:`shrink_for`), so no step ever turns a full-size image into
  float32 (a 64 Mi-pixel image would take 256 MiB per channel).
- ``scale_to_unit``: stored values to [0, 1] by their nominal range (uint8: /255), else min-max.
- ``normalize``: ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import PIL.Image
from pydantic import TypeAdapter, ValidationError
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from learning.dicom import Image, ImageRejected
from protocol.errors import Reason
from protocol.preprocessing import (
    DicomRescale,
    InvertMonochrome1,
    Normalize,
    PreprocessStep,
    Resize,
    ScaleTo01,
    SelectFrame,
    ToGrayscale,
    ToRGB,
    Window,
)

Step = Callable[[Image], Image]
Pipeline = Callable[[Image], np.ndarray]

_STEP_ADAPTER: TypeAdapter[Any] = TypeAdapter(PreprocessStep)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# -- the steps --------------------------------------------------------------------------------------
def select_frame(index: int | str = "middle") -> Step:
    """Keep one frame of a multi-frame image (``middle`` by default, negative from the end)."""
    def step(img: Image) -> Image:
        n = img.frames
        i = n // 2 if index == "middle" else int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise ImageRejected(f"frame {index} of an image with {n} frame(s)", reason=Reason.FRAME_OUT_OF_RANGE)
        return replace(img, pixels=img.pixels[i : i + 1])

    return step


def dicom_rescale() -> Step:
    """Apply a grayscale DICOM's modality LUT or rescale slope/intercept (stored values to modality units)."""
    def step(img: Image) -> Image:
        ds = img.dataset
        if ds is None or img.channels != 1 or img.unit:
            return img
        if "ModalityLUTSequence" not in ds and "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
            return img
        out = apply_modality_lut(img.pixels, ds).astype(np.float32, copy=False)
        vr = _rescaled_range(ds, img.value_range)
        return replace(img, pixels=out, value_range=vr)

    return step


def invert_monochrome1() -> Step:
    """Make MONOCHROME1 images (white is low) MONOCHROME2, now or once the pixels are in [0, 1]."""
    def step(img: Image) -> Image:
        if img.photometric != "MONOCHROME1":
            return img
        if img.unit:
            return replace(img, pixels=1.0 - img.pixels, photometric="MONOCHROME2")
        return replace(img, invert_pending=True, photometric="MONOCHROME2")

    return step


def window(center: float | None = None, width: float | None = None) -> Step:
    """Map to [0, 1] through a window: the given center/width, else the DICOM's VOI LUT or window, else min-max."""
    def step(img: Image) -> Image:
        if img.unit:
            return img
        x = img.pixels.astype(np.float32, copy=False)
        if center is not None and width is not None:
            lo = center - width / 2.0
            out = (x - lo) / float(width)
        elif img.source != "dicom" or img.channels != 1:
            return img  # PNG/JPEG and colour DICOM hold presentation values already
        elif img.dataset is not None and img.channels == 1 and _has_voi(img.dataset):
            y = apply_voi_lut(x, img.dataset)
            y_lo, y_hi = _voi_output_range(img.dataset)
            out = (np.asarray(y, dtype=np.float32) - y_lo) / max(y_hi - y_lo, 1e-6)
        else:
            out = _minmax(x)
        return _to_unit(img, out)

    return step


def to_grayscale() -> Step:
    """RGB to one luma channel; grayscale images pass unchanged."""
    def step(img: Image) -> Image:
        if img.channels == 1:
            return img
        if img.photometric not in ("RGB",):
            raise ImageRejected(f"cannot convert {img.photometric} to grey", reason=Reason.UNSUPPORTED_PHOTOMETRIC)
        gray = np.tensordot(img.pixels.astype(np.float32, copy=False), _LUMA, axes=([3], [0]))[..., None]
        return replace(img, pixels=gray.astype(np.float32), photometric="MONOCHROME2")

    return step


def to_rgb() -> Step:
    """Grayscale to three equal channels; RGB images pass unchanged."""
    def step(img: Image) -> Image:
        if img.channels == 3:
            return img
        return replace(img, pixels=np.repeat(img.pixels, 3, axis=3), photometric="RGB")

    return step


def resize(height: int, width: int) -> Step:
    """Bilinear resize of every frame and channel to ``height`` x ``width`` (float32)."""
    def step(img: Image) -> Image:
        f, h, w, c = img.pixels.shape
        if (h, w) == (height, width):
            return img
        src = img.pixels.astype(np.float32, copy=False)
        out = np.empty((f, height, width, c), dtype=np.float32)
        for i in range(f):
            for ch in range(c):
                plane = PIL.Image.fromarray(np.ascontiguousarray(src[i, :, :, ch]), mode="F")
                out[i, :, :, ch] = np.asarray(plane.resize((width, height), PIL.Image.Resampling.BILINEAR))
        return replace(img, pixels=out)

    return step


def shrink_for(height: int, width: int) -> Step:
    """Box-average the stored pixels by the largest whole factor that keeps them >= ``height`` x ``width``.

    Runs before any step that converts to float; integer images stay integer (rounded mean), so
    the value range and every later step see the same kind of values, only fewer of them.
    """

    def step(img: Image) -> Image:
        f, h, w, c = img.pixels.shape
        k = min(h // height, w // width)
        if k < 2:
            return img
        x = img.pixels[:, : h // k * k, : w // k * k, :].reshape(f, h // k, k, w // k, k, c)
        dtype = img.pixels.dtype
        if np.issubdtype(dtype, np.integer):
            acc = np.int64 if np.issubdtype(dtype, np.signedinteger) else np.uint64
            total = x.sum(axis=(2, 4), dtype=acc)
            out = ((total + (k * k) // 2) // (k * k)).astype(dtype)
        else:
            out = x.mean(axis=(2, 4), dtype=np.float64).astype(dtype)
        return replace(img, pixels=out)

    return step


def scale_to_unit() -> Step:
    """Scale to [0, 1] by the stored value range (else min-max); unit images pass unchanged."""
    def step(img: Image) -> Image:
        if img.unit:
            return img
        x = img.pixels.astype(np.float32, copy=False)
        if img.value_range is not None and img.value_range[1] > img.value_range[0]:
            lo, hi = img.value_range
            out = (x - lo) / (hi - lo)
        else:
            out = _minmax(x)
        return _to_unit(img, out)

    return step


def normalize(mean: Sequence[float], std: Sequence[float]) -> Step:
    """``(x - mean) / std`` per channel."""
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    if m.shape != s.shape:
        raise ValueError(f"normalize: {len(m)} means but {len(s)} stds")

    def step(img: Image) -> Image:
        if len(m) not in (1, img.channels):
            raise ImageRejected(
                f"normalize has {len(m)} channel statistics, the image {img.channels} channels",
                reason=Reason.WRONG_CHANNELS,
            )
        x = img.pixels.astype(np.float32, copy=False)
        return replace(img, pixels=(x - m) / s)

    return step


# -- building -------------------------------------------------------------------------------------
def _parse(spec: PreprocessStep | Mapping[str, Any]) -> Any:
    if isinstance(spec, Mapping):
        try:
            return _STEP_ADAPTER.validate_python(dict(spec))
        except ValidationError as exc:
            raise ValueError(f"bad preprocessing step {dict(spec)!r}: {exc.errors()[0]['msg']}") from exc
    return spec


def make_step(spec: PreprocessStep | Mapping[str, Any]) -> Step:
    """One step from its profile model (or the same as a dict, e.g. from a manifest)."""
    spec = _parse(spec)
    if isinstance(spec, SelectFrame):
        return select_frame(spec.index)
    if isinstance(spec, DicomRescale):
        return dicom_rescale()
    if isinstance(spec, InvertMonochrome1):
        return invert_monochrome1()
    if isinstance(spec, Window):
        return window(spec.center, spec.width)
    if isinstance(spec, ToGrayscale):
        return to_grayscale()
    if isinstance(spec, ToRGB):
        return to_rgb()
    if isinstance(spec, Resize):
        return resize(spec.height, spec.width)
    if isinstance(spec, ScaleTo01):
        return scale_to_unit()
    if isinstance(spec, Normalize):
        return normalize(spec.mean, spec.std)
    raise ValueError(f"unknown preprocessing step {spec!r}")


def build_pipeline(steps: Sequence[PreprocessStep | Mapping[str, Any]]) -> Pipeline:
    """Compose the steps; the result maps an :class:`Image` to float32 ``(C, H, W)``."""
    specs = [_parse(s) for s in steps]
    units = [make_step(s) for s in specs]
    target = next((s for s in specs if isinstance(s, Resize)), None)
    if target is not None:  # shrink first (after frame selection), while the pixels are still integers
        lead = next((i for i, s in enumerate(specs) if not isinstance(s, SelectFrame)), len(specs))
        units.insert(lead, shrink_for(target.height, target.width))

    def run(img: Image) -> np.ndarray:
        for unit in units:
            img = unit(img)
        if img.frames != 1:
            raise ImageRejected(
                f"{img.frames} frames and no select_frame step in this box's preprocessing", reason=Reason.MULTI_FRAME
            )
        return np.ascontiguousarray(img.pixels[0].transpose(2, 0, 1), dtype=np.float32)

    return run


# -- helpers ----------------------------------------------------------------------------------------
def _to_unit(img: Image, out: np.ndarray) -> Image:
    out = np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
    if img.invert_pending:
        out = 1.0 - out
    return replace(img, pixels=out, unit=True, invert_pending=False, value_range=(0.0, 1.0))


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return (x - lo) / (hi - lo)


def _has_voi(ds: Dataset) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _rescaled_range(ds: Dataset, stored: tuple[float, float] | None) -> tuple[float, float] | None:
    if stored is None or "ModalityLUTSequence" in ds:
        return None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    a, b = stored[0] * slope + intercept, stored[1] * slope + intercept
    return (min(a, b), max(a, b))


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The output range ``apply_voi_lut`` maps to: the LUT's bit depth, or the windowing range pydicom's ``apply_windowing`` uses (stored range, after the rescale when one is present)."""
    seq = ds.get("VOILUTSequence")
    if seq:
        return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return y_min, y_max
