"""Binary diagnostic metrics for reports: AUC, balanced accuracy, sensitivity at a fixed specificity.

Screening for melanoma is judged at a high specificity (few benign lesions sent to excision):
:func:`sensitivity_at_specificity` reads the ROC curve (scikit-learn's ``roc_curve``) at the
best sensitivity whose false-positive rate stays within ``1 - specificity``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float = 0.9) -> float:
    """Return the highest true-positive rate over thresholds whose specificity is at least ``specificity``."""
    y = np.asarray(y_true).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("need both classes to read a ROC curve")
    fpr, tpr, _ = roc_curve(y, np.asarray(score, dtype=np.float64))
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max())


def binary_report(y_true: np.ndarray, p_positive: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Return AUC, balanced accuracy and accuracy at ``threshold``, and sensitivity at 90 % specificity."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_positive, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    return {
        "auc": float(roc_auc_score(y, p)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "accuracy": float((pred == y).mean()),
        "sensitivity_at_90_specificity": sensitivity_at_specificity(y, p, 0.9),
    }
