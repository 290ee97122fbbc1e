"""In-memory image datasets: the :class:`ArrayDataset` container, MedMNIST npz, generated demo data.

Everything loads into an :class:`ArrayDataset` (images as numpy, labels int64, class names, and
optionally an id per image). Folders of image files (CSV or JSON-metadata labels, DICOM) load in
``learning/folders.py``; the file decoding they share is ``learning/image_files.py``.
Tensors are made per batch (:meth:`ArrayDataset.batch`), so a large uint8 set is not copied
to float32 all at once. Bad input raises :class:`DatasetError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from learning.data_path import find_data_file, warn_generated
from protocol.errors import FedscanError, Reason

Normalize = tuple[float | Sequence[float], float | Sequence[float]]
DEFAULT_NORMALIZE: Normalize = (0.5, 0.25)  # firmware_configs/xray-cxr-28.yaml
SPLITS = ("train", "val", "test")
KNOWN_CLASSES = {"pneumoniamnist": ["normal", "pneumonia"]}


class DatasetError(FedscanError, ValueError):
    """Input that cannot become a dataset: missing keys, mismatched lengths, unreadable images."""

    reason = Reason.BAD_DATASET


@dataclass
class ArrayDataset:
    """Images, labels, class names and (optionally) image ids.

    Images are ``(N, H, W)`` or ``(N, H, W, C)`` (uint8 in [0, 255], or float already in [0, 1]),
    labels int64 ``(N,)`` in ``[0, len(classes))``; ``ids`` (empty, or one string per image, e.g.
    the file name without suffix) follow every :meth:`subset`.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

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
        if self.ids and len(self.ids) != len(labels):
            raise DatasetError(f"{len(self.ids)} ids for {len(labels)} images")
        self.images, self.labels, self.classes, self.ids = images, labels, list(self.classes), list(self.ids)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """How many classes the dataset names."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """1 for grayscale (N, H, W) images, else the trailing channel count."""
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: np.ndarray | Sequence[int]) -> ArrayDataset:
        """The images at ``indices`` (in that order), with the same classes and their ids."""
        idx = np.asarray(indices, dtype=np.int64)
        ids = [self.ids[i] for i in idx] if self.ids else []
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes), ids=ids)

    def class_counts(self) -> np.ndarray:
        """Images per class, in class order."""
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
        return normalize_tensor(x, normalize), torch.from_numpy(self.labels[idx].copy())

    def to_tensor_dataset(self, normalize: Normalize | None = DEFAULT_NORMALIZE) -> TensorDataset:
        """All images and labels as a ``TensorDataset`` (see :meth:`batch`)."""
        x, y = self.batch(None, normalize)
        return TensorDataset(x, y)


def normalize_tensor(x: torch.Tensor, normalize: Normalize | None) -> torch.Tensor:
    """``(x - mean) / std`` per channel of an NCHW batch in [0, 1]; ``None`` leaves it unchanged."""
    if normalize is None:
        return x
    mean = torch.as_tensor(normalize[0], dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.as_tensor(normalize[1], dtype=torch.float32).reshape(-1, 1, 1)
    if mean.numel() not in (1, x.shape[1]) or std.numel() not in (1, x.shape[1]):
        raise DatasetError(f"normalize {normalize} does not fit {x.shape[1]} channel(s)")
    return (x - mean) / std


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
        raise DatasetError(f"{p} [{split}]: {e.message}") from e


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
