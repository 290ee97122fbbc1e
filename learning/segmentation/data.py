"""Lesion-segmentation data of two modalities in one common input: PH2 dermoscopy and brain FLAIR.

Both modalities become :class:`SegSet` s of ``(N, C, S, S)`` float32 images in [0, 1] and
``(N, S, S)`` uint8 masks in {0, 1}, with the *case* of every image: the unit a Dice score is
computed over (a PH2 image; an MRI subject, whose slices are pooled into one volume).

- **PH2** (``ph2/images/IMDnnn.png`` + ``ph2/masks/IMDnnn.png``, 255 = lesion, masks drawn by
  clinicians): :func:`preprocess_rgb` turns one RGB image into the model's input (grey by ITU-R
  601 luma when ``channels == 1``; antialiased bilinear resize of the whole image to ``S × S``);
  the serving path uses the same function, so training and serving see the same pixels.
- **Brain FLAIR** (``learning.brain_mri``): per-volume normalised axial slices, replicated to
  ``channels``. Its masks come from an automatic model (DLWMLS), not from clinicians:
  :data:`MASKS_NOTE` goes into every report.

:func:`build_splits` cuts both into training sites and the coordinator's validation and test
splits: PH2 by image, MRI by subject (``brain_mri.split_subjects``: no subject in two splits or
two sites). The split seed is separate from training seeds, so seeds vary training only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from learning import brain_mri
from learning.datasets import DatasetError
from learning.segmentation.errors import SegmentationError

MASKS_NOTE = brain_mri.MASKS_NOTE
PH2_NOTE = "PH2 lesion masks drawn by clinicians (Mendonça et al. 2013); one device, one hospital"
PH2, MRI = "dermoscopy", "brain_flair"
MODALITIES = (PH2, MRI)
_PH2_ID = re.compile(r"^(IMD\d+)\.png$")


@dataclass(frozen=True)
class SegSet:
    """Images with their lesion masks, of one modality (or ``mixed``).

    Images float32 ``(N, C, S, S)`` in [0, 1], masks uint8 ``(N, S, S)`` in {0, 1}, the case id of
    each image, the modality and the in-plane pixel spacing in mm after resizing (None: unknown).
    """

    images: np.ndarray
    masks: np.ndarray
    cases: np.ndarray
    modality: str
    spacing_mm: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        """Refuse arrays that do not line up (a typed :class:`DatasetError`)."""
        if self.images.ndim != 4 or self.masks.ndim != 3:
            raise DatasetError(f"images must be (N,C,S,S) and masks (N,S,S): {self.images.shape}, {self.masks.shape}")
        if self.images.shape[0] != self.masks.shape[0] or self.images.shape[2:] != self.masks.shape[1:]:
            raise DatasetError(f"images {self.images.shape} and masks {self.masks.shape} do not pair up")
        if len(self.cases) != len(self.images):
            raise DatasetError(f"{len(self.images)} images but {len(self.cases)} case ids")

    def __len__(self) -> int:
        """Number of images (slices for MRI)."""
        return len(self.images)

    @property
    def channels(self) -> int:
        """Input channels."""
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        """Input side in pixels."""
        return int(self.images.shape[-1])

    def subset(self, idx: np.ndarray) -> SegSet:
        """The images at ``idx``."""
        return SegSet(self.images[idx], self.masks[idx], self.cases[idx], self.modality, self.spacing_mm)

    @staticmethod
    def concat(parts: Sequence[SegSet]) -> SegSet:
        """Several sets as one (centralized training); modality ``mixed`` when they differ."""
        mods = {p.modality for p in parts}
        return SegSet(np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts]),
                      np.concatenate([p.cases for p in parts]), mods.pop() if len(mods) == 1 else "mixed", None)


def preprocess_rgb(rgb: np.ndarray, *, size: int, channels: int) -> np.ndarray:
    """Turn one uint8 RGB ``(H, W, 3)`` or grey ``(H, W)`` image into the model's input.

    Returns ``(channels, size, size)`` float32 in [0, 1]: grey by ITU-R 601 luma when
    ``channels == 1``, antialiased bilinear resize of the whole image (PIL), then / 255.
    """
    if channels not in (1, 3):
        raise SegmentationError(f"channels must be 1 or 3, got {channels}")
    x = np.asarray(rgb)
    if x.dtype != np.uint8:
        raise DatasetError(f"expected uint8 pixels, got {x.dtype}")
    if x.ndim == 3 and x.shape[2] == 4:
        x = x[..., :3]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)) or min(x.shape[:2]) < 2:
        raise DatasetError(f"expected an (H, W, 3) RGB or (H, W) grey image, got shape {x.shape}")
    img = Image.fromarray(np.ascontiguousarray(x))
    img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary ``(H, W)`` mask → ``(size, size)`` uint8 {0, 1}: antialiased bilinear, then ≥ 0.5."""
    img = Image.fromarray(((np.asarray(mask) > 0) * 255).astype(np.uint8))
    return (np.asarray(img.resize((size, size), Image.Resampling.BILINEAR)) >= 128).astype(np.uint8)


def ph2_ids(root: Path) -> list[str]:
    """PH2 image ids (``IMDnnn``) that have a mask, sorted; an image without its mask is refused."""
    images = root / "images"
    if not images.is_dir():
        raise DatasetError(f"{images}: no such folder (expected ph2/images/IMDnnn.png)")
    ids = sorted(m.group(1) for p in images.iterdir() if (m := _PH2_ID.match(p.name)))
    missing = [i for i in ids if not (root / "masks" / f"{i}.png").exists()]
    if missing:
        raise DatasetError(f"{root}: {len(missing)} PH2 images without a mask, e.g. {missing[:3]}")
    if not ids:
        raise DatasetError(f"{images}: no IMDnnn.png images")
    return ids


def _read_png(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode))
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def load_ph2_pair(root: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """One PH2 image ``(H, W, 3)`` uint8 and its binary mask ``(H, W)`` uint8 {0, 1} at full size."""
    rgb = _read_png(root / "images" / f"{image_id}.png", "RGB")
    mask = _read_png(root / "masks" / f"{image_id}.png", "L")
    if mask.shape != rgb.shape[:2]:
        raise DatasetError(f"{image_id}: mask shape {mask.shape} differs from image shape {rgb.shape[:2]}")
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 255}:
        raise DatasetError(f"{image_id}: mask is not binary (values {values[:6].tolist()}…; expected 0 and 255)")
    return rgb, (mask == 255).astype(np.uint8)


def load_ph2(root: Path, ids: Sequence[str] | None = None, *, size: int, channels: int) -> SegSet:
    """PH2 images ``ids`` (default: all) with their masks, preprocessed as :func:`preprocess_rgb`."""
    names = list(ids) if ids is not None else ph2_ids(root)
    images, masks = [], []
    for i in names:
        rgb, mask = load_ph2_pair(root, i)
        images.append(preprocess_rgb(rgb, size=size, channels=channels))
        masks.append(resize_mask(mask, size))
    return SegSet(np.stack(images), np.stack(masks), np.asarray(names), PH2, None)


def load_mri(root: Path, subjects: Sequence[str], *, size: int, channels: int) -> SegSet:
    """FLAIR slices of ``subjects`` (``learning.brain_mri``), replicated to ``channels``."""
    s = brain_mri.load_slices(root, subjects, size=size)
    images = np.repeat(s.images[:, None], channels, axis=1).astype(np.float32)
    return SegSet(images, s.masks.astype(np.uint8), s.subjects, MRI, s.spacing_mm)


@dataclass(frozen=True)
class SiteData:
    """One training site: its name, modality and training images (they never leave the site)."""

    name: str
    modality: str
    train: SegSet

    def __len__(self) -> int:
        """Training images (slices for MRI)."""
        return len(self.train)


@dataclass(frozen=True)
class SegSplits:
    """Training sites plus the coordinator's validation and the test split, per modality."""

    sites: list[SiteData]
    val: dict[str, SegSet]
    test: dict[str, SegSet]
    notes: list[str] = field(default_factory=lambda: [PH2_NOTE, f"brain FLAIR: {MASKS_NOTE}"])


def split_ph2(ids: Sequence[str], *, sites: int, val: int, test: int, seed: int
              ) -> tuple[list[list[str]], list[str], list[str]]:
    """Seeded split of PH2 image ids into ``sites`` training sites, ``val`` and ``test`` (by image)."""
    names = list(ids)
    if sites < 1 or val < 0 or test < 0 or len(names) < sites + val + test:
        raise DatasetError(f"cannot split {len(names)} images into {sites} sites + {val} val + {test} test")
    order = [names[i] for i in np.random.default_rng([seed, 2]).permutation(len(names))]
    test_ids, val_ids, rest = order[:test], order[test:test + val], order[test + val:]
    return [sorted(rest[i::sites]) for i in range(sites)], sorted(val_ids), sorted(test_ids)


def build_splits(data_root: Path, *, size: int, channels: int, seed: int = 0, ph2_sites: int = 2,
                 mri_sites: int = 2, ph2_val: int = 30, ph2_test: int = 40, mri_val: int = 4, mri_test: int = 5,
                 ph2_limit: int | None = None, mri_limit: int | None = None) -> SegSplits:
    """Both modalities from ``data_root`` (``ph2/`` and ``brain-mri-flair/``), split for federation.

    ``ph2_limit`` / ``mri_limit`` keep only the first images / subjects of the seeded order (tiny
    runs: ``--quick`` and tests); the splits stay disjoint.
    """
    ph2_root, mri_root = data_root / "ph2", data_root / "brain-mri-flair"
    ids = ph2_ids(ph2_root)
    if ph2_limit is not None:
        ids = [ids[i] for i in sorted(np.random.default_rng([seed, 1]).permutation(len(ids))[:ph2_limit])]
    p_sites, p_val, p_test = split_ph2(ids, sites=ph2_sites, val=ph2_val, test=ph2_test, seed=seed)
    subjects = brain_mri.list_subjects(mri_root)
    if mri_limit is not None:
        subjects = [subjects[i] for i in sorted(np.random.default_rng([seed, 3]).permutation(len(subjects))[:mri_limit])]
    m_sites, m_val, m_test = brain_mri.split_subjects(subjects, sites=mri_sites, val=mri_val, test=mri_test, seed=seed)
    sites = [SiteData(f"derm-{i + 1}", PH2, load_ph2(ph2_root, s, size=size, channels=channels))
             for i, s in enumerate(p_sites)]
    sites += [SiteData(f"mri-{i + 1}", MRI, load_mri(mri_root, s, size=size, channels=channels))
              for i, s in enumerate(m_sites)]
    val = {PH2: load_ph2(ph2_root, p_val, size=size, channels=channels),
           MRI: load_mri(mri_root, m_val, size=size, channels=channels)}
    test = {PH2: load_ph2(ph2_root, p_test, size=size, channels=channels),
            MRI: load_mri(mri_root, m_test, size=size, channels=channels)}
    return SegSplits(sites, val, test)


def load_site(root: Path, picks: np.ndarray | Sequence[int] | None = None, *, name: str, size: int, channels: int
              ) -> SiteData:
    """Load one edge box's training site from a data folder.

    PH2 (``images/`` + ``masks/``) or brain FLAIR (``flair/`` + ``lesion-masks/``), told apart by
    their folders.

    ``picks``: indices into the sorted case list (PH2 image ids, MRI subjects) this site holds
    (default: all); out-of-range or repeated indices are refused (``DatasetError``).
    """
    if (root / "images").is_dir():
        cases, modality = ph2_ids(root), PH2
    elif (root / "flair").is_dir():
        cases, modality = brain_mri.list_subjects(root), MRI
    else:
        raise DatasetError(f"{root}: neither a PH2 folder (images/, masks/) nor a FLAIR one (flair/, lesion-masks/)")
    if picks is not None:
        idx = np.asarray(picks)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or len(np.unique(idx)) != len(idx) \
                or (len(idx) and (idx.min() < 0 or idx.max() >= len(cases))):
            raise DatasetError(f"site picks must be distinct indices in [0, {len(cases)}), got {idx[:8].tolist()}")
        cases = [cases[i] for i in idx.tolist()]
    if not cases:
        raise DatasetError(f"{root}: the site holds no cases")
    data = load_ph2(root, cases, size=size, channels=channels) if modality == PH2 else (
        load_mri(root, cases, size=size, channels=channels))
    return SiteData(name, modality, data)


def load_validation(data_root: Path, *, size: int, channels: int, seed: int = 0, ph2_sites: int = 2, mri_sites: int = 2,
                    ph2_val: int = 30, ph2_test: int = 40, mri_val: int = 4, mri_test: int = 5) -> dict[str, SegSet]:
    """The coordinator's validation split of :func:`build_splits` (same seed, same cases), loading only it.

    A modality whose folder is missing under ``data_root`` is left out; neither present is a ``DatasetError``.
    """
    out: dict[str, SegSet] = {}
    ph2_root, mri_root = data_root / "ph2", data_root / "brain-mri-flair"
    if (ph2_root / "images").is_dir():
        _, val, _ = split_ph2(ph2_ids(ph2_root), sites=ph2_sites, val=ph2_val, test=ph2_test, seed=seed)
        out[PH2] = load_ph2(ph2_root, val, size=size, channels=channels)
    if (mri_root / "flair").is_dir():
        _, val, _ = brain_mri.split_subjects(brain_mri.list_subjects(mri_root), sites=mri_sites, val=mri_val,
                                             test=mri_test, seed=seed)
        out[MRI] = load_mri(mri_root, val, size=size, channels=channels)
    if not out:
        raise DatasetError(f"{data_root}: neither ph2/ nor brain-mri-flair/ is there")
    return out
