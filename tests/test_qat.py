"""QAT: fake-quant trains, stays out of the travelling tensors, and exports as a float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export.onnx_export import export_verified_onnx
from firmware.profile import FirmwareProfile, TrainingSection
from learning.datasets import make_synthetic
from learning.models import build_model
from learning.qat import (
    ActivationFakeQuant,
    QATConv2d,
    fake_quant_modules,
    fake_quant_weight,
    freeze_observers,
    is_qat,
    maybe_prepare_qat,
    prepare_qat,
    to_float,
)
from learning.state import get_tensors, set_tensors, travelling_names
from protocol.manifest import InputSpec

OBSERVER_WORDS = ("input_fq", "min_val", "max_val", "scale", "zero_point", "observer", "fake_quant")


def _batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return make_synthetic(n, seed=seed).batch()


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_observers_do_not_travel(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", width=8, norm=norm)
    qat = prepare_qat(model)
    qat.train()
    qat(_batch()[0])  # observers now hold ranges
    assert all(torch.isfinite(fq.min_val) for fq in fake_quant_modules(qat))
    names = travelling_names(qat)
    assert names == travelling_names(model)
    assert not [n for n in names if any(w in n for w in OBSERVER_WORDS)]
    assert not [k for k in qat.state_dict() if any(w in k for w in OBSERVER_WORDS)]
    tensors = get_tensors(qat)
    assert list(tensors) == names
    if norm == "batch":
        assert any(n.endswith("running_mean") for n in names)
        assert not any(n.endswith("num_batches_tracked") for n in names)
    # the float model loads the QAT model's update and vice versa
    set_tensors(model, tensors)
    set_tensors(qat, get_tensors(model))


def test_prepare_works_on_a_copy_and_to_float_restores() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", width=8)
    qat = prepare_qat(model)
    assert not is_qat(model) and is_qat(qat)
    first = next(m for m in qat.modules() if isinstance(m, nn.Conv2d))
    assert type(first) is QATConv2d
    assert type(next(m for m in model.modules() if isinstance(m, nn.Conv2d))) is nn.Conv2d
    with pytest.raises(ValueError):
        prepare_qat(qat)
    back = to_float(qat)
    assert not is_qat(back) and type(next(m for m in back.modules() if isinstance(m, nn.Conv2d))) is nn.Conv2d
    assert not any(isinstance(m, ActivationFakeQuant) for m in back.modules())
    x = _batch(8)[0]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model.eval()(x))


def test_fake_quant_really_quantizes_and_passes_gradients() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    q = fake_quant_weight(w)
    for c in range(4):
        step = w[c].detach().abs().max() / 127
        codes = q[c].detach() / step
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.unique().numel() <= 255
    q.sum().backward()
    assert w.grad is not None and torch.all(w.grad == 1)  # straight-through estimator

    model = build_model("small_cnn", width=8)
    qat = prepare_qat(model).train()
    x, y = _batch()
    loss = nn.functional.cross_entropy(qat(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qat.parameters())
    qat.eval()
    with torch.no_grad():
        diff = (qat(x) - model.eval()(x)).abs().max().item()
    assert 0 < diff < 0.5  # quantization noise: present but small


def test_qat_trains_a_groupnorm_model_and_freezing_stops_observers() -> None:
    torch.manual_seed(0)
    qat = prepare_qat(build_model("small_cnn", width=8, norm="group")).train()
    x, y = _batch(256, seed=3)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(qat(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    freeze_observers(qat)
    before = [(fq.min_val.clone(), fq.max_val.clone()) for fq in fake_quant_modules(qat)]
    qat(x * 10)
    assert all(
        torch.equal(a, fq.min_val) and torch.equal(b, fq.max_val)
        for (a, b), fq in zip(before, fake_quant_modules(qat), strict=True)
    )


def test_profile_switches_qat() -> None:
    model = build_model("small_cnn", width=8)
    assert maybe_prepare_qat(model, TrainingSection(qat=False)) is model
    assert is_qat(maybe_prepare_qat(model, TrainingSection(qat=True)))
    profile = FirmwareProfile(name="p", modality="CR", model={"classes": ["a", "b"]}, training={"qat": True})
    assert is_qat(maybe_prepare_qat(model, profile))


def test_qat_model_exports_as_its_float_twin(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = prepare_qat(build_model("small_cnn", width=8)).train()
    x = _batch(64)[0]
    qat(x)
    v = export_verified_onnx(
        qat, tmp_path / "q.onnx", input_spec=InputSpec(channels=1, height=28, width=28), verify_images=x.numpy()
    )
    assert v.max_abs_diff < 1e-4
    assert is_qat(qat)  # the trained model is left as it was
    assert np.isfinite(v.max_abs_diff)
