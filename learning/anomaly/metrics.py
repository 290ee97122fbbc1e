"""Detection and localisation metrics for anomaly maps (scikit-learn underneath).

- :func:`image_auroc`: area under the ROC of image scores vs image labels (1 = anomalous);
- :func:`position_matched_auroc`: the same over pairs of slices from the same axial band only. On
  the brain FLAIR data the label is confounded with position (slices with lesions sit mid-brain,
  lesion-free ones towards the top and bottom: a slice's distance from the middle alone separates
  them), so a plain image AUROC partly measures anatomy; comparing an anomalous slice only with
  normal slices of the same band removes most of that (within a band the lesion rate can still
  change with position: ``bench/anomaly.py`` reports what a position-only score gets on both);
- :func:`pixel_auprc`: average precision of map values vs lesion pixels, over the given pixels
  (foreground of every test image) — the localisation figure used by Baur et al.'s benchmark and
  by FedDis;
- :func:`best_dice`: the best Dice of ``map > t`` vs the lesion masks over thresholds ``t``
  (pooled over all pixels), as FedDis reports it — an upper bound: ``t`` is picked on the test
  masks; :func:`dice_at` is the Dice at a threshold fixed beforehand (the site's pixel threshold).

Brain lesion masks in this project are automatic (DLWMLS), not drawn by hand.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from learning.anomaly.errors import AnomalyError


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for ``labels`` (needs both classes)."""
    y = np.asarray(labels).astype(int).ravel()
    if len(np.unique(y)) < 2:
        raise AnomalyError("image AUROC needs both normal and anomalous images")
    return float(roc_auc_score(y, np.asarray(scores, np.float64).ravel()))


POSITION_BANDS = 20
"""Equal-width bands of relative axial position (0-0.05, …, 0.95-1) for :func:`position_matched_auroc`.

Chosen with a score that sees no image, before any model was scored this way: the closeness of a
slice to the middle of its subject gets a plain AUROC of 0.78 on the FLAIR validation split and,
matched within 5 / 10 / 20 / 40 bands, 0.655 / 0.701 / **0.610** / 0.620 — 20 leaves the least of the
confound (none of them removes it all: subjects differ in where their lesions sit)."""


def position_bands(position: np.ndarray, bands: int = POSITION_BANDS) -> np.ndarray:
    """The band (0 … ``bands`` − 1) of each relative position in [0, 1]."""
    pos = np.asarray(position, np.float64).ravel()
    if pos.size and (pos.min() < 0 or pos.max() > 1):
        raise AnomalyError("relative positions must lie in [0, 1]")
    return np.minimum((pos * bands).astype(np.int64), bands - 1)


def position_matched_auroc(labels: np.ndarray, scores: np.ndarray, position: np.ndarray,
                           bands: int = POSITION_BANDS) -> float:
    """ROC AUC over (anomalous, normal) pairs within the same position band only.

    Each band's AUROC weighted by its number of such pairs (the probability that an anomalous image
    outscores a normal one *of the same band*); bands without both classes add nothing.
    """
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, np.float64).ravel()
    band = position_bands(position, bands)
    if not len(y) == len(s) == len(band):
        raise AnomalyError(f"labels, scores and positions differ in length: {len(y)}, {len(s)}, {len(band)}")
    total, weight = 0.0, 0
    for b in np.unique(band):
        sel = band == b
        pos, neg = int(y[sel].sum()), int((y[sel] == 0).sum())
        if pos and neg:
            total += float(roc_auc_score(y[sel], s[sel])) * pos * neg
            weight += pos * neg
    if weight == 0:
        raise AnomalyError("no position band holds both normal and anomalous images")
    return total / weight


def _pixels(maps: np.ndarray, masks: np.ndarray, where: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if np.shape(maps) != np.shape(masks):
        raise AnomalyError(f"maps {np.shape(maps)} and masks {np.shape(masks)} differ")
    sel = np.ones(np.shape(maps), bool) if where is None else np.asarray(where, bool)
    y = (np.asarray(masks)[sel] > 0).astype(np.uint8)
    if y.sum() == 0:
        raise AnomalyError("pixel metrics need at least one lesion pixel")
    return y, np.asarray(maps, np.float64)[sel]


def pixel_auprc(maps: np.ndarray, masks: np.ndarray, where: np.ndarray | None = None) -> float:
    """Average precision of map values for lesion pixels (over ``where``, default every pixel)."""
    y, s = _pixels(maps, masks, where)
    return float(average_precision_score(y, s))


def best_dice(maps: np.ndarray, masks: np.ndarray, where: np.ndarray | None = None) -> tuple[float, float]:
    """``(dice, threshold)``: the best pooled Dice of ``map ≥ t`` over thresholds (an upper bound)."""
    y, s = _pixels(maps, masks, where)
    precision, recall, thr = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]
    dice = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    i = int(np.argmax(dice))
    return float(dice[i]), float(thr[i])


def dice_at(maps: np.ndarray, masks: np.ndarray, threshold: float) -> float:
    """Pooled Dice of ``map > threshold`` vs the masks (1.0 when both are empty)."""
    pred = np.asarray(maps) > threshold
    truth = np.asarray(masks) > 0
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, truth).sum() / denom)
