"""The coordinator's validation pass: metrics and temperature from one forward pass per model."""

from __future__ import annotations

import numpy as np
import pytest

import coordinator.validation_pass as validation_pass
from coordinator.model_spec import model_spec_for
from fedscan import experiments
from firmware.profile import find_profile
from learning.datasets import ArrayDataset
from learning.metrics import evaluate
from learning.models import build_model
from learning.state import set_tensors


@pytest.fixture()
def val() -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 2, 40),
                        classes=["normal", "pneumonia"])


def test_one_forward_pass_per_model(val: ArrayDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = model_spec_for(find_profile("xray-cxr-28"))
    calls: list[int] = []
    real = validation_pass.predict_logits

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(validation_pass, "predict_logits", counting)
    vp = validation_pass.ValidationPass(spec, val)
    w0, w1 = experiments.initial(spec, 0), experiments.initial(spec, 1)
    m0 = vp.metrics(w0)
    c0 = vp.calibration(w0)
    assert len(calls) == 1
    vp.metrics(w1)
    assert len(calls) == 2  # a different model is a new pass, never stale logits
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, w0)
    ref = evaluate(model, val)
    assert m0["val_accuracy"] == pytest.approx(ref["accuracy"])
    assert m0["val_loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert c0.temperature > 0 and c0.fitted_on == "validation"
