"""In-memory image datasets: MedMNIST npz, image folders (PNG/JPEG + CSV), DICOM files, generated demo data.

Everything loads into an :class:`ArrayDataset` (images as numpy, labels int64, class names).
Tensors are made per batch (:meth:`ArrayDataset.batch`), so a large uint8 set is not copied
to float32 all at once. Bad input raises :class:`DatasetError` naming the file and the problem.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from learning.data_path import find_data_file, warn_generated

Normalize = tuple[float | Sequence[float], float | Sequence[float]]
DEFAULT_NORMALIZE: Normalize = (0.5, 0.25)  # firmware_configs/xray-cxr-28.yaml
SPLITS = ("train", "val", "test")
KNOWN_CLASSES = {"pneumoniamnist": ["normal", "pneumonia"]}


class DatasetError(ValueError):
    """Input that cannot become a dataset: missing keys, mismatched lengths, unreadable images."""


@dataclass
class ArrayDataset:
    """Images ``(N, H, W)`` or ``(N, H, W, C)`` (uint8 in [0, 255], or float already in [0, 1]),
    labels int64 ``(N,)`` in ``[0, len(classes))``, and the class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        labels = np.asarray(self.labels)
        if images.ndim not in (3, 4):
            raise DatasetError(f"images must be (N,H,W) or (N,H,W,C), got shape {images.shape}")
        if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
            raise DatasetError(f"images must be uint8 or float, got {images.dtype}")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DatasetError(f"labels must be (N,) or (N,1), got shape {labels.shape}")
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        if not self.classes:
            self.classes = [f"class_{i}" for i in range(int(labels.max()) + 1 if labels.size else 0)]
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DatasetError(
                f"labels span [{labels.min()}, {labels.max()}] but there are {len(self.classes)} classes"
            )
        self.images, self.labels, self.classes = images, labels, list(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: np.ndarray | Sequence[int]) -> ArrayDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes))

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def batch(
        self, indices: np.ndarray | Sequence[int] | None = None, normalize: Normalize | None = DEFAULT_NORMALIZE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: float32 NCHW scaled to [0, 1] then ``(x - mean) / std`` per channel, and int64 labels."""
        idx = slice(None) if indices is None else np.asarray(indices, dtype=np.int64)
        imgs = self.images[idx]
        x = torch.from_numpy(np.ascontiguousarray(imgs))
        x = x.to(torch.float32).div_(255.0) if imgs.dtype == np.uint8 else x.to(torch.float32)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        if normalize is not None:
            mean = torch.as_tensor(normalize[0], dtype=torch.float32).reshape(-1, 1, 1)
            std = torch.as_tensor(normalize[1], dtype=torch.float32).reshape(-1, 1, 1)
            if mean.numel() not in (1, x.shape[1]) or std.numel() not in (1, x.shape[1]):
                raise DatasetError(f"normalize {normalize} does not fit {x.shape[1]} channel(s)")
            x = (x - mean) / std
        return x, torch.from_numpy(self.labels[idx].copy())

    def to_tensor_dataset(self, normalize: Normalize | None = DEFAULT_NORMALIZE) -> TensorDataset:
        x, y = self.batch(None, normalize)
        return TensorDataset(x, y)


# ---------------------------------------------------------------------------------------------- MedMNIST


def _classes_for(path: Path, num_classes: int) -> list[str]:
    known = KNOWN_CLASSES.get(path.stem.split("_")[0].lower())
    if known is not None and len(known) >= num_classes:
        return list(known)
    return [f"class_{i}" for i in range(num_classes)]


def load_medmnist(path: str | Path, split: str = "train") -> ArrayDataset:
    """One split of a MedMNIST 2D npz (``{split}_images`` (N,H,W[,3]) uint8, ``{split}_labels`` (N,1))."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    p = Path(path)
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{p}: not a readable npz ({e})") from e
    with npz:
        keys = set(npz.files)
        need = {f"{split}_images", f"{split}_labels"}
        if not need <= keys:
            raise DatasetError(f"{p}: missing keys {sorted(need - keys)} (has {sorted(keys)})")
        images = npz[f"{split}_images"]
        labels = npz[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DatasetError(f"{p}: multi-label sets ({labels.shape[1]} labels per image) are not supported")
        label_maxes = [int(npz[k].max()) for k in keys if k.endswith("_labels") and npz[k].size]
    if images.ndim == 4 and images.shape[3] not in (1, 3):
        raise DatasetError(f"{p}: {split}_images has {images.shape[3]} channels (expected 1 or 3)")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    num_classes = max(label_maxes, default=-1) + 1
    try:
        return ArrayDataset(images, labels, _classes_for(p, num_classes))
    except DatasetError as e:
        raise DatasetError(f"{p} [{split}]: {e}") from e


def make_synthetic(n: int, seed: int = 0, size: int = 28) -> ArrayDataset:
    """A learnable 2-class grayscale set: noisy "lung fields"; class 1 adds a bright blurred opacity.

    Only for running without real data (see :func:`load_demo_splits`); says nothing medical.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    lungs += np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    labels = rng.integers(0, 2, n).astype(np.int64)
    imgs = np.empty((n, size, size), np.float32)
    for i in range(n):
        img = 0.25 + 0.35 * lungs + rng.normal(0, 0.08, (size, size))
        if labels[i]:
            cx, cy = rng.choice([0.3, 0.7]) + rng.normal(0, 0.05), rng.uniform(0.3, 0.75)
            r = rng.uniform(0.08, 0.16)
            img += 0.35 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        imgs[i] = img
    return ArrayDataset(np.clip(imgs * 255, 0, 255).astype(np.uint8), labels, ["normal", "pneumonia"])


def load_demo_splits(name: str = "pneumoniamnist.npz", *, allow_generated: bool = True) -> dict[str, ArrayDataset]:
    """``{"train", "val", "test"}`` from the shared real data; generated (loudly) when the file is missing."""
    p = find_data_file(name)
    if p is not None:
        return {s: load_medmnist(p, s) for s in SPLITS}
    if not allow_generated:
        raise DatasetError(f"{name} not found in the shared data folder (set FEDSCAN_DATA)")
    warn_generated(f"dataset {name}")
    return {s: make_synthetic(n, seed=i) for i, (s, n) in enumerate(zip(SPLITS, (2000, 400, 400), strict=True))}


# ---------------------------------------------------------------------------------------------- files
# Files go through the same decoders (learning/dicom.py) and preprocessing steps
# (learning/transforms.py) as the inference service, so training and serving see the same pixels.
# The steps stop at [0, 1]; normalization happens per batch (ArrayDataset.batch), and the
# [0, 1] values are stored as uint8 (a rounding of at most 1/510) to keep large sets small.

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))
_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}


def unit_steps(size: tuple[int, int], channels: int = 1) -> list[dict[str, Any]]:
    """The default chain from stored pixels to [0, 1] (the demo profile's steps without ``normalize``)."""
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
    return step.get("op") if isinstance(step, Mapping) else getattr(step, "op", None)


def _content_type(path: Path, data: bytes) -> str:
    if data[128:132] == b"DICM":
        return "application/dicom"
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    return _SUFFIX.get(path.suffix.lower(), "application/octet-stream")


class _FileDecoder:
    """Path → uint8 ``(H, W)`` or ``(H, W, 3)`` through decode + preprocessing steps (``normalize`` dropped)."""

    def __init__(self, size: tuple[int, int], channels: int, steps: Sequence[Any] | None) -> None:
        from learning.transforms import build_pipeline
        from protocol.profile import InputSection

        if channels not in (1, 3):
            raise DatasetError(f"channels must be 1 or 3, got {channels}")
        chain = list(steps) if steps is not None else unit_steps(size, channels)
        self.pipeline = build_pipeline([s for s in chain if _op(s) != "normalize"])
        self.accept = InputSection(channels=channels, height=size[0], width=size[1])
        self.size, self.channels = size, channels

    def __call__(self, path: Path) -> np.ndarray:
        from learning.dicom import ImageRejected, decode

        data = path.read_bytes()  # FileNotFoundError / OSError: the caller names the file
        try:
            chw = self.pipeline(decode(data, _content_type(path, data), self.accept))
        except ImageRejected as e:
            raise DatasetError(f"{path}: {e}") from e
        if chw.shape != (self.channels, *self.size):
            raise DatasetError(f"{path}: preprocessing gave {chw.shape}, expected {(self.channels, *self.size)}")
        hwc = np.round(np.clip(chw, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
        return hwc[:, :, 0] if self.channels == 1 else hwc


def _classes_and_indices(labels: Sequence[str | int], classes: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    names = [str(v).strip() for v in labels]
    if classes is None:
        numeric = all(n.lstrip("-").isdigit() for n in names)
        classes = sorted(set(names), key=int) if numeric else sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise DatasetError(f"labels {unknown[:5]} are not among the classes {list(classes)}")
    return list(classes), np.array([lookup[v] for v in names], dtype=np.int64)


def _load_files(paths: Sequence[Path], decoder: _FileDecoder, listed_in: str) -> np.ndarray:
    images = []
    for path in paths:
        try:
            images.append(decoder(path))
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: {listed_in} but missing") from e
        except OSError as e:
            raise DatasetError(f"{path}: cannot read ({e})") from e
    return np.stack(images)


def load_image_folder(
    root: str | Path,
    labels_csv: str | Path,
    *,
    size: tuple[int, int] = (28, 28),
    channels: int = 1,
    classes: Sequence[str] | None = None,
    steps: Sequence[Any] | None = None,
) -> ArrayDataset:
    """Image files (PNG, JPEG, also DICOM) under ``root`` listed in a CSV with header ``filename,label``.

    Labels are class names (or integers as text); ``classes`` fixes their order, else they are
    sorted (numerically when all are integers). Pixels go through ``steps`` (a firmware
    profile's ``preprocessing``; its ``normalize`` is left to batch time) or :func:`unit_steps`.
    """
    root_p, csv_p = Path(root), Path(labels_csv)
    try:
        with csv_p.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            if not {"filename", "label"} <= fields:
                raise DatasetError(f"{csv_p}: needs columns 'filename,label', has {sorted(fields)}")
            rows = [(r["filename"], r["label"]) for r in reader]
    except OSError as e:
        raise DatasetError(f"{csv_p}: cannot read ({e})") from e
    if not rows:
        raise DatasetError(f"{csv_p}: no rows")
    if any(fn is None or lb is None or not fn.strip() or not lb.strip() for fn, lb in rows):
        raise DatasetError(f"{csv_p}: a row has an empty filename or label")
    class_names, y = _classes_and_indices([lb for _, lb in rows], classes)
    decoder = _FileDecoder(size, channels, steps)
    images = _load_files([root_p / fn.strip() for fn, _ in rows], decoder, f"listed in {csv_p.name}")
    return ArrayDataset(images, y, class_names)


def load_dicom_files(
    paths: Sequence[str | Path],
    labels: Sequence[int | str],
    size: tuple[int, int] = (28, 28),
    *,
    channels: int = 1,
    classes: Sequence[str] | None = None,
    steps: Sequence[Any] | None = None,
) -> ArrayDataset:
    """Dataset from DICOM files: middle frame, Modality LUT (rescale slope/intercept), MONOCHROME1
    inverted, VOI window from the file else min-max, grey, bilinear resize (:func:`unit_steps`)."""
    if len(paths) != len(labels):
        raise DatasetError(f"{len(paths)} DICOM paths but {len(labels)} labels")
    if not paths:
        raise DatasetError("no DICOM files given")
    class_names, y = _classes_and_indices(labels, classes)
    images = _load_files([Path(p) for p in paths], _FileDecoder(size, channels, steps), "given")
    return ArrayDataset(images, y, class_names)
