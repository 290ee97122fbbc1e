"""Detection and localisation metrics for anomaly maps (scikit-learn underneath).

- :func:`image_auroc`: area under the ROC of image scores vs image labels (1 = anomalous);
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
