"""Normal-only training sites and labelled evaluation sets for the anomaly job.

- **PneumoniaMNIST** (:func:`pneumonia_splits`): the normal chest X-rays of the train split are
  dealt to ``sites`` sites at random (seeded); pneumonia is the anomaly. Validation and test are
  the dataset's own splits (normal and pneumonia), images only — no masks.
- **Brain FLAIR** (:func:`brain_splits`): subjects (never slices) are split into ``sites`` sites,
  validation and test subjects (``learning.brain_mri.split_subjects``); a site trains on its
  subjects' lesion-free slices; slices with lesions are the anomalies, their masks the pixel
  truth. The masks are automatic (DLWMLS), not drawn by hand (``MASKS_NOTE``).

Each site holds out normal images of its own for its threshold (``calib``): a fraction of its
images for PneumoniaMNIST, its last subject for the brain (never a subject it trains on).

**One box's share** (:func:`load_box_site`, the agent's ``--data`` / ``--indices``): a MedMNIST
``.npz`` (``indices``: positions into its train split, as ``fedscan partition`` writes them; the box
keeps the normal images among them, the last ``calib_fraction`` of those held out for its
threshold) or a brain FLAIR folder (``indices``: positions into its sorted subjects; lesion-free
slices; the last picked subject held out).

**Scanner appearance.** All images of each set come from one source, so sites differ only by
sampling. To stand in for sites with different scanners (the case FedDis is built for), a site
can carry an intensity response ``gamma`` applied to every image it sees — training,
calibration and the test images it scores (``x ** gamma``, background stays 0). With
``SHIFT_NONE`` every gamma is 1. This is a simulation, and reports say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from learning.anomaly.errors import AnomalyError
from learning.brain_mri import MASKS_NOTE, list_subjects, load_slices, split_subjects
from protocol.errors import Reason

SHIFT_NONE: tuple[float, ...] = (1.0, 1.0, 1.0)
SHIFT_GAMMA: tuple[float, ...] = (1.0, 0.6, 1.7)
"""Per-site intensity responses (``x ** gamma``) for the simulated-scanner setting."""

__all__ = ["MASKS_NOTE", "SHIFT_GAMMA", "SHIFT_NONE", "AnomalySplits", "EvalSet", "Site", "apply_appearance",
           "brain_splits", "load_box_site", "pneumonia_splits"]


def apply_appearance(images: np.ndarray, gamma: float) -> np.ndarray:
    """``images ** gamma`` (float32, images in [0, 1]); gamma 1 returns a copy."""
    if not gamma > 0:
        raise AnomalyError(f"gamma must be positive, got {gamma}")
    x = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    return x.copy() if gamma == 1.0 else np.power(x, np.float32(gamma)).astype(np.float32)


@dataclass(frozen=True)
class Site:
    """One site: normal training images, held-out normal images for its threshold, its gamma."""

    name: str
    train: np.ndarray
    calib: np.ndarray
    gamma: float = 1.0

    def __len__(self) -> int:
        """Training images (what an agent reports as its local examples)."""
        return len(self.train)


@dataclass(frozen=True)
class EvalSet:
    """Images ``(N, H, W)``, image labels (1 = anomalous), lesion masks (None: no pixel truth).

    ``position``: for brain slices, each slice's relative axial place in its subject (0 to 1,
    ``SliceSet.relative_position``), for the position-matched AUROC (None: not slices).
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    position: np.ndarray | None = None

    def seen_by(self, gamma: float) -> EvalSet:
        """The same set through a site's intensity response."""
        return EvalSet(apply_appearance(self.images, gamma), self.labels, self.masks, self.position)


@dataclass(frozen=True)
class AnomalySplits:
    """Sites, the coordinator's validation set, the test set and what the data are."""

    dataset: str
    sites: list[Site]
    val: EvalSet
    test: EvalSet
    note: str


def _gammas(shift: Sequence[float], sites: int) -> list[float]:
    if len(shift) < sites:
        raise AnomalyError(f"{sites} sites need {sites} gammas, got {list(shift)}")
    return [float(g) for g in shift[:sites]]


def pneumonia_splits(npz: Path, *, sites: int = 3, seed: int = 0, calib_fraction: float = 0.2,
                     shift: Sequence[float] = SHIFT_NONE, limit: int | None = None) -> AnomalySplits:
    """PneumoniaMNIST: normal train X-rays dealt to ``sites``; val/test keep both classes.

    ``limit`` caps every part (normal train images, val, test) for quick runs.
    """
    if not 0.0 < calib_fraction < 1.0:
        raise AnomalyError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    gammas = _gammas(shift, sites)

    def images(split: str) -> tuple[np.ndarray, np.ndarray]:
        x = arrays[f"{split}_images"].astype(np.float32) / 255.0
        if x.ndim == 4:  # RGB MedMNIST sets: luminance
            x = x.mean(axis=-1)
        return x, arrays[f"{split}_labels"].reshape(-1).astype(np.int64)

    rng = np.random.default_rng(seed)
    x, y = images("train")
    normal = x[y == 0][rng.permutation(int((y == 0).sum()))][:limit]
    out = []
    for i, part in enumerate(np.array_split(normal, sites)):
        n_cal = max(1, round(calib_fraction * len(part)))
        g = gammas[i]
        out.append(Site(f"site{i}", apply_appearance(part[n_cal:], g), apply_appearance(part[:n_cal], g), g))

    def eval_set(split: str) -> EvalSet:
        xs, ys = images(split)
        idx = rng.permutation(len(xs))[:limit] if limit else np.arange(len(xs))
        return EvalSet(xs[idx], (ys[idx] > 0).astype(np.int64))

    return AnomalySplits("pneumoniamnist", out, eval_set("val"), eval_set("test"),
                         "normal chest X-rays only for training; pneumonia is the anomaly; image labels only")


def brain_splits(root: Path, *, sites: int = 3, val: int = 3, test: int = 5, seed: int = 0, size: int = 64,
                 shift: Sequence[float] = SHIFT_NONE, subjects: Sequence[str] | None = None) -> AnomalySplits:
    """Brain FLAIR: subjects split into sites / val / test; sites train on lesion-free slices."""
    names = list(subjects) if subjects is not None else list_subjects(root)
    site_ids, val_ids, test_ids = split_subjects(names, sites=sites, val=val, test=test, seed=seed)
    if any(len(s) < 2 for s in site_ids):
        raise AnomalyError(f"each site needs ≥ 2 subjects (one held out for its threshold): {site_ids}")
    gammas = _gammas(shift, sites)
    slices = load_slices(root, names, size=size)
    out = []
    for i, ids in enumerate(site_ids):
        train = slices.of_subjects(ids[:-1])
        calib = slices.of_subjects(ids[-1:])
        out.append(Site(f"site{i}", apply_appearance(train.images[~train.has_lesion], gammas[i]),
                        apply_appearance(calib.images[~calib.has_lesion], gammas[i]), gammas[i]))

    def eval_set(ids: list[str]) -> EvalSet:
        s = slices.of_subjects(ids)
        return EvalSet(s.images, s.has_lesion.astype(np.int64), s.masks, s.relative_position)

    return AnomalySplits("brain-flair", out, eval_set(val_ids), eval_set(test_ids),
                         f"lesion-free FLAIR slices only for training; slices with lesions are the anomaly; {MASKS_NOTE}")


def _picked(picks: np.ndarray | None, n: int, what: str) -> np.ndarray:
    idx = np.arange(n) if picks is None else np.asarray(picks).reshape(-1)
    if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= n)):
        raise AnomalyError(f"indices must be integer positions into the {n} {what}", reason=Reason.BAD_CONFIG)
    return idx.astype(np.int64)


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:] == (size, size):
        return images.astype(np.float32)
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None], size=(size, size),
                      mode="bilinear", align_corners=False)
    out: np.ndarray = np.clip(t[:, 0].numpy(), 0.0, 1.0).astype(np.float32)
    return out


def box_site_npz(npz: Path, picks: np.ndarray | None, *, name: str, size: int, calib_fraction: float = 0.2) -> Site:
    """A box's normal images from a MedMNIST ``.npz`` train split (see the module doc)."""
    with np.load(npz) as z:
        x, y = z["train_images"], z["train_labels"].reshape(-1)
    idx = _picked(picks, len(x), "train images")
    normal = idx[y[idx] == 0]
    if len(normal) < 2:
        raise AnomalyError(f"{npz}: {name} needs ≥ 2 normal images among its picks, has {len(normal)}")
    imgs = x[normal].astype(np.float32) / 255.0
    imgs = imgs.mean(axis=-1) if imgs.ndim == 4 else imgs
    n_cal = min(len(normal) - 1, max(1, round(calib_fraction * len(normal))))
    out = _resized(imgs, size)
    return Site(name, out[:-n_cal], out[-n_cal:])


def box_site_flair(root: Path, picks: np.ndarray | None, *, name: str, size: int) -> Site:
    """A box's lesion-free FLAIR slices: its picked subjects, the last one held out (see the module doc)."""
    names = list_subjects(root)
    chosen = [names[i] for i in _picked(picks, len(names), "subjects")]
    if len(chosen) < 2:
        raise AnomalyError(f"{name} needs ≥ 2 subjects (one held out for its threshold), got {chosen}")
    train, calib = load_slices(root, chosen[:-1], size=size), load_slices(root, chosen[-1:], size=size)
    return Site(name, train.images[~train.has_lesion], calib.images[~calib.has_lesion])


def load_box_site(path: Path, picks: np.ndarray | None, *, name: str, size: int) -> Site:
    """One box's normal images: an ``.npz`` (MedMNIST) or a brain FLAIR folder (see the module doc)."""
    if path.is_dir():
        return box_site_flair(path, picks, name=name, size=size)
    if path.suffix == ".npz":
        return box_site_npz(path, picks, name=name, size=size)
    raise AnomalyError(f"{path}: the anomaly job reads a MedMNIST .npz or a brain-mri-flair folder")
