"""Decode PNG, JPEG and DICOM bytes into an :class:`Image`, refusing bad input with a reason.

Shared by training and inference: the decoders only turn bytes into pixels plus the few
attributes the preprocessing steps need (``learning/transforms.py``); every check that can
refuse an image lives here and raises :class:`ImageRejected` with a reason code and the HTTP
status the service answers with. The decoders never log pixel values or patient attributes.

Limits come from the firmware profile's ``input`` section (:class:`protocol.profile.InputSection`):
accepted formats, DICOM modalities, bytes and pixels (checked from the header, before the
pixels are decompressed, so a decompression bomb is refused without being decoded).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import PIL.Image
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from protocol.profile import InputSection

PIL.Image.init()  # register Pillow's decoders now, not on the first request

Format = Literal["png", "jpeg", "dicom", "array"]

CONTENT_TYPES: dict[str, Format] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/dicom": "dicom",
}


class ImageRejected(ValueError):
    """An image the box refuses: ``reason`` is a stable code, ``status_code`` the HTTP status."""

    def __init__(self, reason: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status_code = status_code


@dataclass
class Image:
    """Decoded pixels and what the preprocessing steps need to know about them.

    ``pixels`` is always ``(frames, height, width, channels)``. ``value_range`` is the nominal
    range of the stored values (``(0, 255)`` for 8-bit) while the values are still stored
    values; steps that change the value space (rescale, window) update or clear it. ``unit``
    says the values are presentation values in [0, 1]. ``invert_pending`` defers the
    MONOCHROME1 inversion until the values are presentation values (DICOM applies it after the
    VOI LUT). ``dataset`` is the DICOM dataset (rescale and VOI attributes), never logged.
    """

    pixels: np.ndarray
    photometric: str
    source: Format
    value_range: tuple[float, float] | None = None
    unit: bool = False
    invert_pending: bool = False
    modality: str | None = None
    dataset: Dataset | None = field(default=None, repr=False)
    transfer_syntax: str | None = None

    @property
    def frames(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[3])


def image_from_array(arr: np.ndarray, photometric: str | None = None) -> Image:
    """An :class:`Image` from a training array: ``(H, W)``, ``(H, W, C)`` or ``(F, H, W, C)``.

    Integer arrays keep their dtype's range (uint8 → 0..255), so training arrays and the
    same picture sent as a PNG go through identical steps.
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[None, :, :, None]
    elif a.ndim == 3:
        a = a[None]
    elif a.ndim != 4:
        raise ImageRejected("bad_shape", f"an image array has 2 to 4 dimensions, got {a.ndim}")
    if a.shape[3] not in (1, 3):
        raise ImageRejected("wrong_channels", f"{a.shape[3]} channels (1 or 3 accepted)")
    vr: tuple[float, float] | None = None
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        vr = (float(info.min), float(info.max))
    photo = photometric or ("MONOCHROME2" if a.shape[3] == 1 else "RGB")
    return Image(pixels=a, photometric=photo, source="array", value_range=vr)


def format_of(content_type: str | None) -> Format:
    """The image format of a Content-Type header value, or 415 ``unsupported_content_type``."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    fmt = CONTENT_TYPES.get(base)
    if fmt is None:
        raise ImageRejected(
            "unsupported_content_type",
            f"content type {base or '<none>'!r} is not one of {sorted(set(CONTENT_TYPES))}",
            415,
        )
    return fmt


def decode(data: bytes, content_type: str | None, accept: InputSection) -> Image:
    """Decode ``data`` by its content type under the profile's input limits."""
    fmt = format_of(content_type)
    if fmt not in accept.formats:
        raise ImageRejected("format_not_accepted", f"this box accepts {accept.formats}, not {fmt}", 415)
    if len(data) > accept.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes exceed the limit of {accept.max_bytes}", 413)
    if not data:
        raise ImageRejected("empty_body", "no image bytes were sent", 400)
    if fmt == "dicom":
        return decode_dicom(data, accept)
    return decode_raster(data, fmt, accept)


# -- PNG / JPEG -------------------------------------------------------------------------------------
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG"}


def decode_raster(data: bytes, fmt: Format, accept: InputSection) -> Image:
    """PNG or JPEG via Pillow; the pixel count is checked from the header before decoding."""
    want = _PIL_FORMATS[fmt]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            im = PIL.Image.open(io.BytesIO(data), formats=[want])
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels", f"decompression bomb refused: {exc}", 413) from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageRejected("corrupt_image", f"not a readable {want} file", 400) from exc
    with im:
        w, h = im.size
        if w * h > accept.max_pixels:
            raise ImageRejected("too_many_pixels", f"{w}x{h} exceeds {accept.max_pixels} pixels", 413)
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected("corrupt_image", f"{want} data is truncated or corrupt", 400) from exc
        arr, photometric = _raster_pixels(im)
    vr: tuple[float, float] = (0.0, 255.0) if arr.dtype == np.uint8 else (0.0, 65535.0)
    return Image(pixels=arr[None], photometric=photometric, source=fmt, value_range=vr)


def _raster_pixels(im: PIL.Image.Image) -> tuple[np.ndarray, str]:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode == "1":
        im = im.convert("L")
        mode = "L"
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a16 = np.asarray(im)
        if a16.min(initial=0) < 0 or a16.max(initial=0) > 65535:
            raise ImageRejected("unsupported_pixel_format", "32-bit integer images are not accepted", 415)
        return a16.astype(np.uint16)[:, :, None], "MONOCHROME2"
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)[:, :, None], "MONOCHROME2"
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8), "RGB"
    if mode in ("LA", "RGBA"):
        a = np.asarray(im, dtype=np.uint8)
        if a[:, :, -1].min() < 255:
            raise ImageRejected(
                "wrong_channels", f"{mode} image with a translucent alpha channel (1 or 3 channels accepted)"
            )
        return (a[:, :, :1], "MONOCHROME2") if mode == "LA" else (a[:, :, :3], "RGB")
    if mode in ("CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8), "RGB"
    raise ImageRejected("wrong_channels", f"image mode {mode} is not accepted (1 or 3 channels)")


# -- DICOM ------------------------------------------------------------------------------------------
def read_dataset(data: bytes) -> Dataset:
    """Parse DICOM bytes (Part 10 file), or 400 ``not_dicom`` / ``corrupt_dicom``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise ImageRejected("not_dicom", "not a DICOM Part 10 file (no 'DICM' preamble)", 400) from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageRejected("corrupt_dicom", "the DICOM file cannot be parsed", 400) from exc


def decode_dicom(data: bytes, accept: InputSection) -> Image:
    return decode_dataset(read_dataset(data), accept)


def decode_dataset(ds: Dataset, accept: InputSection) -> Image:
    """Checks, then pixels: pixel data present, modality, size, a decoder for the syntax."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageRejected("no_pixel_data", f"the DICOM object ({_sop_name(ds)}) has no pixel data")
    modality = str(ds.get("Modality", "") or "")
    if accept.modalities and modality not in accept.modalities:
        raise ImageRejected(
            "modality_not_accepted", f"modality {modality or '<none>'!r} is not one of {accept.modalities}"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageRejected("corrupt_dicom", "image attributes (Rows, Columns, ...) are missing") from exc
    if rows * cols * frames > accept.max_pixels:
        raise ImageRejected(
            "too_many_pixels", f"{frames}x{rows}x{cols} exceeds {accept.max_pixels} pixels", 413
        )
    if samples not in (1, 3):
        raise ImageRejected("wrong_channels", f"{samples} samples per pixel (1 or 3 accepted)")
    tsyntax = _transfer_syntax(ds)
    if tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError as exc:
            raise ImageRejected(
                "unsupported_transfer_syntax", f"no decoder exists for {tsyntax.name}", 415
            ) from exc
        if not decoder.is_available:
            raise ImageRejected(
                "unsupported_transfer_syntax", f"no decoder installed for {tsyntax.name} ({tsyntax})", 415
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except ValueError as exc:
        if "less than expected" in str(exc) or "truncat" in str(exc).lower():
            raise ImageRejected("truncated_dicom", "the pixel data is shorter than Rows x Columns says") from exc
        raise ImageRejected("corrupt_dicom", "the pixel data cannot be decoded") from exc
    except (RuntimeError, NotImplementedError) as exc:
        raise ImageRejected(
            "undecodable_pixel_data", f"the {tsyntax.name} pixel data cannot be decoded here", 415
        ) from exc
    except (AttributeError, KeyError, TypeError, EOFError) as exc:
        raise ImageRejected("corrupt_dicom", "the pixel data cannot be decoded") from exc
    arr = np.asarray(arr)
    arr = arr.reshape(frames, rows, cols, samples)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples == 3:
        # pydicom converts YBR_FULL / YBR_FULL_422 to RGB while decoding (as_rgb=True); a
        # JPEG 2000 YBR_RCT / YBR_ICT is RGB once decoded as well.
        photometric = "RGB"
    vr = _stored_range(ds)
    return Image(
        pixels=arr,
        photometric=photometric,
        source="dicom",
        value_range=vr,
        modality=modality or None,
        dataset=ds,
        transfer_syntax=str(tsyntax),
    )


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        raise ImageRejected("corrupt_dicom", "the file meta has no Transfer Syntax UID", 400)
    return UID(str(ts))


def _stored_range(ds: Dataset) -> tuple[float, float] | None:
    bits = ds.get("BitsStored")
    if bits is None:
        return None
    bits = int(bits)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return UID(str(uid)).name if uid else "unknown SOP class"
