"""Quantization-aware training: fake-quant of weights (per-channel, symmetric int8) and of the activations entering every Conv2d / Linear (per-tensor, affine uint8, EMA min/max observer).

``prepare_qat`` returns a *copy* of the model whose Conv2d / Linear layers fake-quantize in
``forward``; parameter names do not change, so ``learning.state.travelling_names`` and the
update frame are identical to the float model's. The observer state lives in non-persistent
buffers of an ``input_fq`` child: it appears neither in ``state_dict`` nor in the travelling
tensors, and never leaves the box. ``to_float`` gives back a plain float model for export
(ONNX → onnxruntime static INT8 with calibration on the coordinator's validation split).

Own wrappers instead of ``torch.ao.quantization.prepare_qat``: the ao flow renames parameters
(fused ``ConvBn`` modules) and has no GroupNorm support, our default norm layer. BatchNorm is not
folded during QAT; onnxruntime folds it before quantizing, so BatchNorm models see slightly
different weight grids at export than in training (GroupNorm models see the same).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # symmetric int8, zero point 0 (what onnxruntime uses per channel)
ACT_QMIN, ACT_QMAX = 0, 255  # affine uint8


class ActivationFakeQuant(nn.Module):
    """Per-tensor affine uint8 fake-quant with an EMA min/max observer (training mode only)."""

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum
        self.observe = True
        self.enabled = True
        self.register_buffer("min_val", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("max_val", torch.tensor(float("-inf")), persistent=False)

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if not torch.isfinite(self.min_val):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the observed range (which always holds 0)."""
        lo = torch.clamp(self.min_val, max=0.0)  # the range must hold 0 exactly (padding, ReLU)
        hi = torch.clamp(self.max_val, min=0.0)
        scale = torch.clamp((hi - lo) / float(ACT_QMAX - ACT_QMIN), min=1e-8)
        zero_point = torch.clamp(torch.round(ACT_QMIN - lo / scale), ACT_QMIN, ACT_QMAX).to(torch.int32)
        return scale.reshape(1), zero_point.reshape(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe (in training) and fake-quantize ``x`` once a range has been seen."""
        if self.training and self.observe:
            self._update(x)
        if not self.enabled or not torch.isfinite(self.min_val):
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale.to(x.device), zero_point.to(x.device),
                                                     ACT_QMIN, ACT_QMAX)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake-quant; gradients pass straight through."""
    amax = w.detach().abs().flatten(1).amax(dim=1)
    scale = torch.clamp(amax / WEIGHT_QMAX, min=1e-12).float()
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX)


class QATConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward fake-quantizes its input and weight (same parameter names)."""

    input_fq: ActivationFakeQuant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution of the fake-quantized input with the fake-quantized weight."""
        out: torch.Tensor = self._conv_forward(self.input_fq(x), fake_quant_weight(self.weight), self.bias)
        return out


class QATLinear(nn.Linear):
    """``nn.Linear`` whose forward fake-quantizes its input and weight (same parameter names)."""

    input_fq: ActivationFakeQuant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear map of the fake-quantized input with the fake-quantized weight."""
        return F.linear(self.input_fq(x), fake_quant_weight(self.weight), self.bias)


_SWAP: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QATConv2d, nn.Linear: QATLinear}
_BACK: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _SWAP.items()}


def prepare_qat(model: nn.Module, *, momentum: float = 0.01) -> nn.Module:
    """A copy of ``model`` with fake-quant on every Conv2d / Linear (exact types only)."""
    if is_qat(model):
        raise ValueError("model is already prepared for QAT")
    m = copy.deepcopy(model)
    for mod in m.modules():
        target = _SWAP.get(type(mod))
        if target is not None:
            mod.__class__ = target
            mod.add_module("input_fq", ActivationFakeQuant(momentum))
    return m


def is_qat(model: nn.Module) -> bool:
    """Whether ``model`` holds fake-quant layers (was prepared for QAT)."""
    return any(type(mod) in _BACK for mod in model.modules())


def to_float(model: nn.Module) -> nn.Module:
    """A plain float copy of a QAT-prepared model (trained weights, no fake-quant, no observers)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        back = _BACK.get(type(mod))
        if back is not None:
            del mod.input_fq
            mod.__class__ = back
    return m


def fake_quant_modules(model: nn.Module) -> list[ActivationFakeQuant]:
    """The model's activation fake-quant modules."""
    return [mod for mod in model.modules() if isinstance(mod, ActivationFakeQuant)]


def freeze_observers(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or resume) updating activation ranges; usual for the last part of QAT."""
    for fq in fake_quant_modules(model):
        fq.observe = not frozen


def qat_enabled(profile: Any) -> bool:
    """``profile.training.qat`` of a ``FirmwareProfile`` (or a ``TrainingSection`` passed directly)."""
    training = getattr(profile, "training", profile)
    return bool(getattr(training, "qat", False))


def maybe_prepare_qat(model: nn.Module, profile: Any) -> nn.Module:
    """``prepare_qat(model)`` when the device profile switches QAT on, else ``model`` unchanged."""
    return prepare_qat(model) if qat_enabled(profile) and not is_qat(model) else model
