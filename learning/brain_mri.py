"""Brain MRI FLAIR volumes (NIfTI, read with nibabel) as 2D axial slices with lesion masks.

The shared set (``../shared/data/brain-mri-flair``) holds 23 subjects: ``flair/SubjN_FL.nii.gz``
and ``lesion-masks/SubjN_FL_DLWMLS.nii.gz`` in the same voxel space. **The masks come from an
automatic model (DLWMLS), not from a clinician**: every report on them says so (``MASKS_NOTE``).

Each volume is normalised on its own (brain voxels clipped at their 99.5th percentile, scaled to
[0, 1]), resized in-plane to ``size`` × ``size`` (bilinear for images, nearest for masks), and
cut into the axial slices that show enough brain. Subjects, never slices, are the unit of every
split: one subject never lands in two splits or two sites.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from learning.datasets import DatasetError

MASKS_NOTE = "lesion masks produced by an automatic model (DLWMLS), not drawn by hand"
_SUBJECT = re.compile(r"^(Subj\d+)_FL\.nii(\.gz)?$")


@dataclass(frozen=True)
class SliceSet:
    """2D slices of several subjects: images float32 ``(N, H, W)`` in [0, 1], masks uint8 ``(N, H, W)`` in {0, 1}, the subject id and axial index of each slice, and the in-plane spacing in mm after resizing."""

    images: np.ndarray
    masks: np.ndarray
    subjects: np.ndarray
    slice_index: np.ndarray
    spacing_mm: tuple[float, float]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> SliceSet:
        """The slices at ``idx`` (same spacing)."""
        return SliceSet(self.images[idx], self.masks[idx], self.subjects[idx], self.slice_index[idx], self.spacing_mm)

    def of_subjects(self, subjects: Sequence[str]) -> SliceSet:
        """The slices of the named subjects."""
        return self.subset(np.flatnonzero(np.isin(self.subjects, list(subjects))))

    @property
    def has_lesion(self) -> np.ndarray:
        """Per slice: does its mask mark any lesion pixel (the anomaly label)."""
        return np.asarray(self.masks.reshape(len(self.masks), -1).any(axis=1))

    @property
    def relative_position(self) -> np.ndarray:
        """Per slice: its axial place among its subject's slices here, 0 (first) to 1 (last); 0.5 if it is alone."""
        out = np.full(len(self), 0.5)
        for subject in np.unique(self.subjects):
            idx = np.flatnonzero(self.subjects == subject)
            if len(idx) > 1:
                ranks = np.argsort(np.argsort(self.slice_index[idx]))
                out[idx] = ranks / (len(idx) - 1)
        return out


def list_subjects(root: Path) -> list[str]:
    """Subject ids with both a FLAIR volume and a lesion mask, in natural order (Subj1, Subj2, … Subj23)."""
    flair = root / "flair"
    if not flair.is_dir():
        raise DatasetError(f"{flair}: no such folder (expected brain-mri-flair/flair/SubjN_FL.nii.gz)")
    out = []
    for p in flair.iterdir():
        m = _SUBJECT.match(p.name)
        if m and _mask_path(root, m.group(1)).exists():
            out.append(m.group(1))
    return sorted(out, key=lambda s: int(s.removeprefix("Subj")))


def _mask_path(root: Path, subject: str) -> Path:
    return root / "lesion-masks" / f"{subject}_FL_DLWMLS.nii.gz"


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib  # heavy-ish; only readers of NIfTI need it

    try:
        img: Any = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as exc:  # nibabel raises several types for truncated / non-NIfTI files
        raise DatasetError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, zooms


def normalise_volume(volume: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Scale one volume to [0, 1]: brain (non-zero) voxels clipped at their ``percentile``."""
    brain = volume[volume > 0]
    hi = float(np.percentile(brain, percentile)) if brain.size else 1.0
    return np.clip(volume / max(hi, 1e-6), 0.0, 1.0).astype(np.float32)


def _resize(slices: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t, size=(size, size), mode=mode, **kw)[:, 0].numpy()


def load_subject(root: Path, subject: str, *, size: int = 64, min_brain_fraction: float = 0.15) -> SliceSet:
    """One subject's axial slices that show at least ``min_brain_fraction`` brain, resized to ``size``."""
    vol, zooms = _read(root / "flair" / f"{subject}_FL.nii.gz")
    mask, _ = _read(_mask_path(root, subject))
    if mask.shape != vol.shape:
        raise DatasetError(f"{subject}: mask shape {mask.shape} differs from FLAIR shape {vol.shape}")
    vol = normalise_volume(vol)
    axial_img = np.moveaxis(vol, 2, 0)  # (slices, X, Y)
    axial_mask = np.moveaxis((mask > 0).astype(np.float32), 2, 0)
    brain = (axial_img > 0.05).reshape(len(axial_img), -1).mean(axis=1)
    keep = np.flatnonzero(brain >= min_brain_fraction)
    images = _resize(axial_img[keep], size, "bilinear")
    masks = (_resize(axial_mask[keep], size, "nearest") > 0.5).astype(np.uint8)
    spacing = (zooms[0] * vol.shape[0] / size, zooms[1] * vol.shape[1] / size)
    return SliceSet(images.astype(np.float32), masks, np.array([subject] * len(keep)), keep.astype(np.int64), spacing)


def load_slices(root: Path, subjects: Sequence[str] | None = None, *, size: int = 64,
                min_brain_fraction: float = 0.15) -> SliceSet:
    """The slices of ``subjects`` (default: every subject), concatenated in subject order."""
    names = list(subjects) if subjects is not None else list_subjects(root)
    if not names:
        raise DatasetError(f"{root}: no subjects with both a FLAIR volume and a lesion mask")
    parts = [load_subject(root, s, size=size, min_brain_fraction=min_brain_fraction) for s in names]
    return SliceSet(np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts]),
                    np.concatenate([p.subjects for p in parts]), np.concatenate([p.slice_index for p in parts]),
                    parts[0].spacing_mm)


def split_subjects(subjects: Sequence[str], *, sites: int, val: int, test: int, seed: int
                   ) -> tuple[list[list[str]], list[str], list[str]]:
    """Seeded split of subject ids.

    ``sites`` training sites (as even as possible), ``val`` validation subjects (the coordinator's) and
    ``test`` test subjects. No subject appears twice.
    """
    names = list(subjects)
    if sites < 1 or val < 0 or test < 0 or len(names) < sites + val + test:
        raise DatasetError(f"cannot split {len(names)} subjects into {sites} sites + {val} val + {test} test")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    test_ids, val_ids, rest = order[:test], order[test:test + val], order[test + val:]
    return [rest[i::sites] for i in range(sites)], val_ids, test_ids
