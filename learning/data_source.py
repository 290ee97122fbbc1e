"""What ``--data`` names: a MedMNIST npz, a labelled image folder, or a DICOM folder, and a site's share of it.

One description (:class:`DataSource`) for every command that reads images (``fedscan agent
--data``, ``fedscan coordinator --val-data``, ``fedscan partition``, the demo):

* ``*.npz``: a MedMNIST 2D file; the agent reads its ``train`` split, the coordinator its ``val``.
* a folder with ``--labels-csv FILE`` (columns ``filename,label``) or ``--label-field PATH``
  (a dotted path into each image's same-stem JSON, e.g. ISIC's ``meta.clinical.benign_malignant``):
  PNG, JPEG or DICOM images, decoded and resized by the device profile's own preprocessing
  steps, the ones the inference service runs (``learning/image_files.py``).
* a folder with ``--data-format dicom`` and ``--labels-csv``: every DICOM file under it.

A folder is read whole (there is no split inside it); a site's share is an index file
(:func:`select`): ``.npy`` positions in the loaded order, or ``.txt`` image ids (one a line, as
``fedscan partition`` writes them). Labels that are missing, malformed or not among the
profile's classes raise :class:`~learning.datasets.DatasetError` naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from firmware.profile import FirmwareProfile
from learning.datasets import ArrayDataset, DatasetError, load_medmnist
from learning.folders import OnMissing, load_dicom_folder, load_image_folder
from learning.splits import read_ids


class DataFormat(StrEnum):
    """How a ``--data`` path is read (``auto``: by what it is)."""

    AUTO = "auto"
    NPZ = "npz"
    IMAGES = "images"
    DICOM = "dicom"


@dataclass(frozen=True)
class DataSource:
    """A ``--data`` argument with its label options."""

    path: Path
    format: DataFormat = DataFormat.AUTO
    labels_csv: Path | None = None
    label_field: str | None = None
    on_missing: OnMissing = "error"

    def resolved_format(self) -> DataFormat:
        """The concrete format; :class:`DatasetError` when the path or the label options do not fit it."""
        fmt = DataFormat(self.format)
        if fmt == DataFormat.AUTO:
            if self.path.is_file() and self.path.suffix.lower() == ".npz":
                fmt = DataFormat.NPZ
            elif self.path.is_dir():
                fmt = DataFormat.IMAGES
            else:
                raise DatasetError(f"{self.path}: --data must be a MedMNIST .npz file or a folder of images")
        if fmt == DataFormat.NPZ:
            if self.labels_csv is not None or self.label_field is not None:
                raise DatasetError(f"{self.path}: an npz carries its labels; --labels-csv/--label-field are for folders")
            return fmt
        if not self.path.is_dir():
            raise DatasetError(f"{self.path}: not a folder")
        if fmt == DataFormat.DICOM and self.labels_csv is None:
            raise DatasetError(f"{self.path}: a DICOM folder needs --labels-csv (filename,label)")
        if fmt == DataFormat.IMAGES and (self.labels_csv is None) == (self.label_field is None):
            raise DatasetError(f"{self.path}: an image folder needs exactly one of --labels-csv and --label-field")
        return fmt

    def describe(self) -> str:
        """One line for logs and reports."""
        labels = f", labels {self.labels_csv}" if self.labels_csv else (
            f", label field {self.label_field}" if self.label_field else "")
        return f"{self.path} ({self.resolved_format().value}{labels})"


def load(src: DataSource, profile: FirmwareProfile, *, split: str = "train") -> ArrayDataset:
    """Load ``src`` for a box of ``profile`` (its input size, channels, preprocessing and class names).

    ``split`` picks an npz's split; a folder is read whole.
    """
    fmt = src.resolved_format()
    if fmt == DataFormat.NPZ:
        return load_medmnist(src.path, split)
    size = (profile.input.height, profile.input.width)
    kw: dict[str, Any] = {"on_missing": src.on_missing, "size": size, "channels": profile.input.channels,
                          "classes": list(profile.model.classes), "steps": profile.preprocessing or None}
    if fmt == DataFormat.DICOM:
        assert src.labels_csv is not None
        return load_dicom_folder(src.path, src.labels_csv, **kw)
    return load_image_folder(src.path, src.labels_csv, label_field=src.label_field, **kw)


def select(data: ArrayDataset, index_file: Path) -> ArrayDataset:
    """A site's share: ``.npy`` positions into ``data``, or a ``.txt`` list of image ids."""
    if index_file.suffix.lower() == ".txt":
        return data.subset(positions_of(data, read_ids(index_file), str(index_file)))
    try:
        idx = np.load(index_file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{index_file}: not a readable .npy of indices ({e})") from e
    idx = np.asarray(idx)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DatasetError(f"{index_file}: indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= len(data)):
        raise DatasetError(f"{index_file}: indices span [{idx.min()}, {idx.max()}] but the data has {len(data)} images")
    return data.subset(idx)


def positions_of(data: ArrayDataset, ids: Sequence[str], listed_in: str) -> np.ndarray:
    """Positions of ``ids`` in ``data`` (in the order given); an unknown id is refused, naming the list."""
    if not data.ids:
        raise DatasetError(f"{listed_in}: image ids need a folder dataset (an npz has none; use a .npy of indices)")
    where = {i: n for n, i in enumerate(data.ids)}
    unknown = [i for i in ids if i not in where]
    if unknown:
        raise DatasetError(f"{listed_in}: {len(unknown)} id(s) not in the data, e.g. {unknown[:3]}")
    return np.array([where[i] for i in ids], dtype=np.int64)
