"""Image files (PNG, JPEG, DICOM) to uint8 training arrays through the serving pipeline.

Files go through the same decoders (``learning/dicom.py``) and preprocessing steps
(``learning/transforms.py``) as the inference service, so training and serving see the same
pixels: the profile's ``resize`` step brings every image to the profile's input size while it
loads, and only arrays of that size are kept. The steps stop at [0, 1]; normalization happens per
batch (:meth:`learning.datasets.ArrayDataset.batch`), and the [0, 1] values are stored as uint8
(a rounding of at most 1/510) to keep large sets small. Bad files raise
:class:`learning.datasets.DatasetError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from firmware.profile import InputSection
from learning.datasets import DatasetError
from learning.dicom import ImageRejected, decode
from learning.transforms import build_pipeline

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))
_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


def unit_steps(size: tuple[int, int], channels: int = 1) -> list[dict[str, Any]]:
    """Return the default chain from stored pixels to [0, 1] (the demo profile's steps without ``normalize``)."""
    return [
        {"op": "select_frame"},
        {"op": "dicom_rescale"},
        {"op": "invert_monochrome1"},
        {"op": "window"},
        {"op": "to_grayscale" if channels == 1 else "to_rgb"},
        {"op": "resize", "height": size[0], "width": size[1]},
        {"op": "scale_to_unit"},
    ]


def _op(step: Any) -> str | None:
    op = step.get("op") if isinstance(step, Mapping) else getattr(step, "op", None)
    return op if isinstance(op, str) else None


def content_type(path: Path, data: bytes) -> str:
    """Return the content type of a file from its magic bytes (DICOM preamble, PNG, JPEG), else its suffix."""
    if data[128:132] == b"DICM":
        return "application/dicom"
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    return _SUFFIX.get(path.suffix.lower(), "application/octet-stream")


def is_dicom_file(path: Path) -> bool:
    """Tell whether ``path`` carries the DICOM preamble (``DICM`` at byte 128), whatever its name."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


class FileDecoder:
    """Path → uint8 ``(H, W)`` or ``(H, W, 3)`` through decode + preprocessing steps (``normalize`` dropped)."""

    def __init__(self, size: tuple[int, int], channels: int, steps: Sequence[Any] | None) -> None:
        """Build the pipeline once: ``steps`` (a profile's ``preprocessing``) or :func:`unit_steps`."""
        if channels not in (1, 3):
            raise DatasetError(f"channels must be 1 or 3, got {channels}")
        chain = list(steps) if steps is not None else unit_steps(size, channels)
        self.pipeline = build_pipeline([s for s in chain if _op(s) != "normalize"])
        self.accept = InputSection(channels=channels, height=size[0], width=size[1])
        self.size, self.channels = size, channels

    def __call__(self, path: Path) -> np.ndarray:
        """Decode one file; ``FileNotFoundError``/``OSError`` are left to the caller, who names the list."""
        data = path.read_bytes()
        try:
            chw = self.pipeline(decode(data, content_type(path, data), self.accept))
        except ImageRejected as e:
            raise DatasetError(f"{path}: {e.reason}: {e.message}") from e
        if chw.shape != (self.channels, *self.size):
            raise DatasetError(f"{path}: preprocessing gave {chw.shape}, expected {(self.channels, *self.size)}")
        hwc = np.round(np.clip(chw, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
        return hwc[:, :, 0] if self.channels == 1 else hwc


def classes_and_indices(labels: Sequence[str | int], classes: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """Class names and int64 label indices; ``classes`` fixes the order, else sorted (numerically if all ints)."""
    names = [str(v).strip() for v in labels]
    if classes is None:
        numeric = all(n.lstrip("-").isdigit() for n in names)
        classes = sorted(set(names), key=int) if numeric else sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise DatasetError(f"labels {unknown[:5]} are not among the classes {list(classes)}")
    return list(classes), np.array([lookup[v] for v in names], dtype=np.int64)


def load_files(paths: Sequence[Path], decoder: FileDecoder, listed_in: str) -> np.ndarray:
    """Decode every path (in order) into one stacked uint8 array; a missing file names where it was listed."""
    if not paths:
        raise DatasetError(f"no image files ({listed_in})")
    images = []
    for path in paths:
        try:
            images.append(decoder(path))
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: {listed_in} but missing") from e
        except OSError as e:
            raise DatasetError(f"{path}: cannot read ({e})") from e
    return np.stack(images)
