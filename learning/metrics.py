"""Classification metrics: accuracy, balanced accuracy, per-class recall, macro one-vs-rest AUC, loss.

A class missing from ``y_true`` has recall ``None`` and no AUC; a set with a single class has
``auc`` ``None`` (never NaN, never a crash). Balanced accuracy averages recall over the classes
present in ``y_true``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from learning.calibration import nll, softmax
from learning.datasets import DEFAULT_NORMALIZE, ArrayDataset, Normalize


def classification_metrics(
    y_true: np.ndarray | Sequence[int], probs: np.ndarray, classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """Metrics from true labels ``(N,)`` and class probabilities ``(N, C)`` (rows need not sum to 1)."""
    from sklearn.metrics import roc_auc_score  # imported on first use, not with the module: ~1.5 s of CPU

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, C) with N={y.shape[0]}, got {p.shape}")
    c = p.shape[1]
    names = list(classes) if classes is not None else [f"class_{i}" for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} probability columns")
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels span [{y.min()}, {y.max()}] outside {c} classes")
    pred = p.argmax(axis=1) if y.size else np.zeros(0, np.int64)
    recall: dict[str, float | None] = {}
    aucs: list[float] = []
    for k, name in enumerate(names):
        pos = y == k
        npos = int(pos.sum())
        recall[name] = float((pred[pos] == k).mean()) if npos else None
        if 0 < npos < y.size:
            aucs.append(float(roc_auc_score(pos, p[:, k])))
    present = [r for r in recall.values() if r is not None]
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    return {
        "n": int(y.size),
        "accuracy": float((pred == y).mean()) if y.size else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "per_class_recall": recall,
        "auc": float(np.mean(aucs)) if aucs else None,
        "confusion": confusion.tolist(),
    }


def metrics_from_logits(
    y_true: np.ndarray | Sequence[int], logits: np.ndarray, classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """:func:`classification_metrics` plus ``loss`` (mean cross-entropy) from raw logits ``(N, C)``, for callers that keep the logits for something else too (e.g. temperature scaling)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"need (N, C) logits with N={y.shape[0]} > 0, got {z.shape}")
    out = classification_metrics(y, softmax(z), classes)
    out["loss"] = nll(z, y)
    return out


EvalData = ArrayDataset | TensorDataset | tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def predict_proba(
    model: nn.Module, data: EvalData, batch_size: int = 256, normalize: Normalize | None = DEFAULT_NORMALIZE
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(labels, softmax probabilities, mean cross-entropy)`` over the whole set, in order."""
    if isinstance(data, ArrayDataset):
        n = len(data)

        def get(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return data.batch(np.arange(i, min(i + batch_size, n)), normalize)
    else:
        xs, ys = data.tensors if isinstance(data, TensorDataset) else data
        n = int(ys.shape[0])

        def get(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return xs[i : i + batch_size], ys[i : i + batch_size]

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    loss_sum = 0.0
    try:
        for i in range(0, n, batch_size):
            x, y = get(i)
            logits = model(x.to(device)).float()
            y = y.to(device=device, dtype=torch.int64)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            labels.append(y.cpu().numpy())
    finally:
        model.train(was_training)
    if not probs:
        return np.zeros(0, np.int64), np.zeros((0, 0)), float("nan")
    return np.concatenate(labels), np.concatenate(probs), loss_sum / n


def evaluate(
    model: nn.Module,
    data: EvalData,
    batch_size: int = 256,
    *,
    normalize: Normalize | None = DEFAULT_NORMALIZE,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``data`` (eval mode, no grad; its mode is restored) and return :func:`classification_metrics` plus ``loss`` (mean cross-entropy).

    ``normalize`` applies to an :class:`ArrayDataset` only; tensors are taken as already normalized.
    """
    if len(data[1] if isinstance(data, tuple) else data) == 0:
        raise ValueError("cannot evaluate on an empty set")
    y, p, loss = predict_proba(model, data, batch_size, normalize)
    if classes is None and isinstance(data, ArrayDataset) and len(data.classes) == p.shape[1]:
        classes = data.classes
    out = classification_metrics(y, p, classes)
    out["loss"] = loss
    return out


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: ArrayDataset, batch_size: int = 256, normalize: Normalize | None = DEFAULT_NORMALIZE
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logits)`` over an :class:`ArrayDataset` in eval mode (mode restored), for calibration."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    try:
        for i in range(0, len(data), batch_size):
            x, _ = data.batch(np.arange(i, min(i + batch_size, len(data))), normalize)
            out.append(model(x.to(device)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return data.labels.copy(), np.concatenate(out) if out else np.zeros((0, data.num_classes), np.float32)
