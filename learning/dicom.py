"""Decode PNG, JPEG and DICOM bytes into an :class:`Image`, refusing bad input with a reason.

Shared by training and inference: the decoders only turn bytes into pixels plus the few
attributes the preprocessing steps need (``learning/transforms.py``); every check that can
refuse an image lives here and raises :class:`ImageRejected` with a reason code (the box's API
maps it to an HTTP status in ``edge_agent/api/errors.py``). The decoders never log pixel values
or patient attributes.

Limits come from the firmware profile's ``input`` section (:class:`firmware.profile.InputSection`):
accepted formats, DICOM modalities, bytes and pixels (checked from the header, before the
pixels are decompressed, so a decompression bomb is refused without being decoded).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import PIL.Image
from pydicom import Dataset, dcmread
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from firmware.profile import InputSection
from protocol.errors import FedscanError, Reason

PIL.Image.init()  # register Pillow's decoders now, not on the first request

Format = Literal["png", "jpeg", "dicom", "array"]

CONTENT_TYPES: dict[str, Format] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/dicom": "dicom",
}


class ImageRejected(FedscanError, ValueError):
    """An image the box refuses, with a stable ``reason`` (the edges map it to their answer)."""

    reason = Reason.CORRUPT_IMAGE


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
        """Number of frames."""
        return int(self.pixels.shape[0])

    @property
    def channels(self) -> int:
        """Samples per pixel (1 or 3)."""
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
        raise ImageRejected(f"an image array has 2 to 4 dimensions, got {a.ndim}", reason=Reason.BAD_SHAPE)
    if a.shape[3] not in (1, 3):
        raise ImageRejected(f"{a.shape[3]} channels (1 or 3 accepted)", reason=Reason.WRONG_CHANNELS)
    vr: tuple[float, float] | None = None
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        vr = (float(info.min), float(info.max))
    photo = photometric or ("MONOCHROME2" if a.shape[3] == 1 else "RGB")
    return Image(pixels=a, photometric=photo, source="array", value_range=vr)


def format_of(content_type: str | None) -> Format:
    """The image format of a Content-Type header value, or ``unsupported_content_type``."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    fmt = CONTENT_TYPES.get(base)
    if fmt is None:
        raise ImageRejected(
            f"content type {base or '<none>'!r} is not one of {sorted(set(CONTENT_TYPES))}",
            reason=Reason.UNSUPPORTED_CONTENT_TYPE,
        )
    return fmt


def decode(data: bytes, content_type: str | None, accept: InputSection) -> Image:
    """Decode ``data`` by its content type under the profile's input limits."""
    fmt = format_of(content_type)
    if fmt not in accept.formats:
        raise ImageRejected(f"this box accepts {accept.formats}, not {fmt}", reason=Reason.FORMAT_NOT_ACCEPTED)
    if len(data) > accept.max_bytes:
        raise ImageRejected(f"{len(data)} bytes exceed the limit of {accept.max_bytes}", reason=Reason.TOO_LARGE)
    if not data:
        raise ImageRejected("no image bytes were sent", reason=Reason.EMPTY_BODY)
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
        raise ImageRejected(f"decompression bomb refused: {exc}", reason=Reason.TOO_MANY_PIXELS) from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageRejected(f"not a readable {want} file", reason=Reason.CORRUPT_IMAGE) from exc
    with im:
        w, h = im.size
        if w * h > accept.max_pixels:
            raise ImageRejected(f"{w}x{h} exceeds {accept.max_pixels} pixels", reason=Reason.TOO_MANY_PIXELS)
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected(f"{want} data is truncated or corrupt", reason=Reason.CORRUPT_IMAGE) from exc
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
            raise ImageRejected("32-bit integer images are not accepted", reason=Reason.UNSUPPORTED_PIXEL_FORMAT)
        return a16.astype(np.uint16)[:, :, None], "MONOCHROME2"
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)[:, :, None], "MONOCHROME2"
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8), "RGB"
    if mode in ("LA", "RGBA"):
        a = np.asarray(im, dtype=np.uint8)
        if a[:, :, -1].min() < 255:
            raise ImageRejected(
                f"{mode} image with a translucent alpha channel (1 or 3 channels accepted)",
                reason=Reason.WRONG_CHANNELS,
            )
        return (a[:, :, :1], "MONOCHROME2") if mode == "LA" else (a[:, :, :3], "RGB")
    if mode in ("CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8), "RGB"
    raise ImageRejected(f"image mode {mode} is not accepted (1 or 3 channels)", reason=Reason.WRONG_CHANNELS)


# -- DICOM ------------------------------------------------------------------------------------------
PARSE_ERRORS: tuple[type[Exception], ...] = (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
                                             IndexError, OverflowError, struct.error, BytesLengthException,
                                             NotImplementedError)
"""What pydicom raises on damaged bytes. It converts element values lazily, on first access, so a
damaged value can raise any of these wherever a dataset is read (found by ``bench/fuzz.py``)."""


def read_dataset(data: bytes) -> Dataset:
    """Parse DICOM bytes (Part 10 file), or ``not_dicom`` / ``corrupt_dicom``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(data))
            _check_elements(ds)
        return ds
    except InvalidDicomError as exc:
        raise ImageRejected("not a DICOM Part 10 file (no 'DICM' preamble)", reason=Reason.NOT_DICOM) from exc
    except PARSE_ERRORS as exc:
        raise ImageRejected("the DICOM file cannot be parsed", reason=Reason.CORRUPT_DICOM) from exc


def _check_elements(ds: Dataset) -> None:
    """Read every element once (nested sequences too), so a damaged one is refused here, not when the study is de-identified or written; command (0000) and file-meta (0002) groups belong outside the dataset body, and a body holding them cannot be written as a Part 10 file."""
    for elem in ds.iterall():
        if elem.tag.group in (0x0000, 0x0002):
            raise ValueError(f"element {elem.tag} of group {elem.tag.group:04X} inside the dataset body")


def decode_dicom(data: bytes, accept: InputSection) -> Image:
    """Parse and decode a DICOM Part 10 file (see :func:`decode_dataset`)."""
    return decode_dataset(read_dataset(data), accept)


def decode_dataset(ds: Dataset, accept: InputSection) -> Image:
    """Checks, then pixels: pixel data present, modality, size, a decoder for the syntax.

    Every refusal is an :class:`ImageRejected`; a damaged element pydicom chokes on while it is
    read is ``corrupt_dicom``.
    """
    try:
        return _decode_dataset(ds, accept)
    except ImageRejected:
        raise
    except PARSE_ERRORS as exc:
        raise ImageRejected("the DICOM file cannot be parsed", reason=Reason.CORRUPT_DICOM) from exc


def _decode_dataset(ds: Dataset, accept: InputSection) -> Image:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageRejected(f"the DICOM object ({_sop_name(ds)}) has no pixel data", reason=Reason.NO_PIXEL_DATA)
    modality = str(ds.get("Modality", "") or "")
    if accept.modalities and modality not in accept.modalities:
        raise ImageRejected(
            f"modality {modality or '<none>'!r} is not one of {accept.modalities}", reason=Reason.MODALITY_NOT_ACCEPTED
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageRejected("image attributes (Rows, Columns, ...) are missing", reason=Reason.CORRUPT_DICOM) from exc
    if rows * cols * frames > accept.max_pixels:
        raise ImageRejected(f"{frames}x{rows}x{cols} exceeds {accept.max_pixels} pixels", reason=Reason.TOO_MANY_PIXELS)
    if samples not in (1, 3):
        raise ImageRejected(f"{samples} samples per pixel (1 or 3 accepted)", reason=Reason.WRONG_CHANNELS)
    tsyntax = _transfer_syntax(ds)
    if tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError as exc:
            raise ImageRejected(
                f"no decoder exists for {tsyntax.name}", reason=Reason.UNSUPPORTED_TRANSFER_SYNTAX
            ) from exc
        if not decoder.is_available:
            raise ImageRejected(
                f"no decoder installed for {tsyntax.name} ({tsyntax})", reason=Reason.UNSUPPORTED_TRANSFER_SYNTAX
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except ValueError as exc:
        if "less than expected" in str(exc) or "truncat" in str(exc).lower():
            raise ImageRejected(
                "the pixel data is shorter than Rows x Columns says", reason=Reason.TRUNCATED_DICOM
            ) from exc
        raise ImageRejected("the pixel data cannot be decoded", reason=Reason.CORRUPT_DICOM) from exc
    except (RuntimeError, NotImplementedError) as exc:
        raise ImageRejected(
            f"the {tsyntax.name} pixel data cannot be decoded here", reason=Reason.UNDECODABLE_PIXEL_DATA
        ) from exc
    except (AttributeError, KeyError, TypeError, EOFError) as exc:
        raise ImageRejected("the pixel data cannot be decoded", reason=Reason.CORRUPT_DICOM) from exc
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
        raise ImageRejected("the file meta has no Transfer Syntax UID", reason=Reason.CORRUPT_DICOM)
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
