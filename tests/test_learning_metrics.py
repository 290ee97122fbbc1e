from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from learning.datasets import ArrayDataset
from learning.metrics import classification_metrics, evaluate, metrics_from_logits


def test_binary_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, ["normal", "pneumonia"])
    pred = probs.argmax(1)
    assert m["n"] == 200
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["per_class_recall"]["pneumonia"] == pytest.approx(((pred == 1) & (y == 1)).sum() / (y == 1).sum())
    assert np.array(m["confusion"]).sum() == 200


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_macro_auc_and_missing_class() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 4)) + 2 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    expected = np.mean([roc_auc_score(y == k, probs[:, k]) for k in range(3)])
    assert m["auc"] == pytest.approx(expected)
    assert m["per_class_recall"]["class_3"] is None  # absent from y_true: no recall, no AUC
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))


def test_single_class_set_reports_none_not_nan() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    m = classification_metrics(np.array([0, 0, 0]), probs)
    assert m["auc"] is None
    assert m["per_class_recall"] == {"class_0": pytest.approx(2 / 3), "class_1": None}
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.array([0, 2]), probs[:2])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        classification_metrics(np.array([0, 1]), probs)


class Fixed(nn.Module):
    """Logits taken from the input's mean: positive mean → class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).mean(1) * self.scale
        return torch.stack([-s, s], dim=1)


def test_evaluate_array_and_tensor_inputs_agree_and_restore_mode() -> None:
    imgs = np.concatenate([np.full((5, 4, 4), 40, np.uint8), np.full((7, 4, 4), 220, np.uint8)])
    labels = np.array([0] * 5 + [1] * 4 + [0] * 3)
    ds = ArrayDataset(imgs, labels, ["normal", "pneumonia"])
    model = Fixed()
    model.train()
    m = evaluate(model, ds, batch_size=5)
    assert model.training
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["per_class_recall"] == {"normal": pytest.approx(5 / 8), "pneumonia": 1.0}
    x, y = ds.batch()
    s = x.flatten(1).mean(1) * 5
    expected_loss = float(nn.functional.cross_entropy(torch.stack([-s, s], 1), y))
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert math.isfinite(m["auc"])
    m2 = evaluate(model, ds.to_tensor_dataset(), batch_size=7, classes=ds.classes)
    assert m2["loss"] == pytest.approx(m["loss"], rel=1e-6)
    assert m2["per_class_recall"] == m["per_class_recall"]
    m3 = evaluate(model, (x, y))
    assert m3["accuracy"] == m["accuracy"]
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, TensorDataset(x[:0], y[:0]))


def test_metrics_from_logits_match_evaluate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(50, 1, 4, 4)
    y = torch.randint(0, 3, (50,))
    ref = evaluate(model, (x, y))
    with torch.no_grad():
        logits = model(x).numpy()
    got = metrics_from_logits(y.numpy(), logits)
    for k in ("accuracy", "balanced_accuracy", "auc", "loss"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5), k
    with pytest.raises(ValueError):
        metrics_from_logits(np.zeros(3, np.int64), np.zeros((2, 3)))
