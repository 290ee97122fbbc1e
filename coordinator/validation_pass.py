"""The coordinator's look at a model on its own validation split.

:class:`ValidationPass`: one forward pass per model feeds both the round's metrics and the
temperature the manifest ships (they used to be two passes, the larger part of the per-round time
the agents spend waiting). :func:`validation_batch_for`: the class-balanced labelled batch each
manifest carries for the rollout's on-box accuracy gate.
"""

from __future__ import annotations

import numpy as np

from coordinator.model_spec import spec_normalize
from coordinator.rounds.settings import ModelSpec
from learning.calibration import expected_calibration_error, fit_temperature, softmax
from learning.datasets import DEFAULT_NORMALIZE, ArrayDataset, Normalize
from learning.metrics import metrics_from_logits, predict_logits
from learning.models import build_model
from learning.state import set_tensors
from protocol.codec import Tensors
from protocol.manifest import Calibration, ValidationBatch
from protocol.tensors import tensor_hash
from protocol.validation_batch import encode_batch


class ValidationPass:
    """Metrics and calibration of models on the validation split.

    The logits of the last model seen are kept, keyed by its tensor hash.
    """

    def __init__(self, spec: ModelSpec, data: ArrayDataset, prefix: str = "val_") -> None:
        """Evaluate models of ``spec`` on ``data``; metric names start with ``prefix``."""
        if len(data) == 0:
            raise ValueError("the validation split is empty")
        self.spec, self.data, self.prefix = spec, data, prefix
        self._last: tuple[str, np.ndarray] | None = None

    def logits(self, tensors: Tensors) -> np.ndarray:
        """The model's logits on the split (computed once per distinct model)."""
        key = tensor_hash(tensors)
        if self._last is None or self._last[0] != key:
            model = build_model(self.spec.architecture, **self.spec.kwargs)
            set_tensors(model, tensors)
            self._last = (key, predict_logits(model, self.data, normalize=spec_normalize(self.spec))[1])
        return self._last[1]

    def metrics(self, tensors: Tensors) -> dict[str, float]:
        """Accuracy, balanced accuracy, AUC and loss, prefixed; undefined ones left out."""
        r = metrics_from_logits(self.data.labels, self.logits(tensors))
        out = {f"{self.prefix}{k}": r[k] for k in ("accuracy", "balanced_accuracy", "auc", "loss")}
        return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}

    def calibration(self, tensors: Tensors) -> Calibration:
        """Temperature scaling fitted on the validation split, with ECE before and after."""
        logits, labels = self.logits(tensors), self.data.labels
        t = fit_temperature(logits, labels)
        return Calibration(temperature=t, fitted_on="validation",
                           ece_before=expected_calibration_error(softmax(logits), labels),
                           ece_after=expected_calibration_error(softmax(logits, t), labels))


def validation_batch_for(data: ArrayDataset, seed: int, per_class: int = 16,
                         normalize: Normalize = DEFAULT_NORMALIZE) -> ValidationBatch:
    """Return a class-balanced labelled batch of model inputs from the coordinator's validation split.

    It is shipped in each manifest for the rollout's on-box accuracy gate.
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[:per_class]
                                  for c in np.unique(data.labels)]))
    x, y = data.subset(idx).to_tensor_dataset(normalize).tensors
    return encode_batch(x.numpy(), y.numpy())
