"""The federation's global model from the firmware profile: its :class:`ModelSpec` and seeded initial weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from coordinator.rounds.settings import ModelSpec
from firmware.profile import FirmwareProfile
from learning.datasets import DEFAULT_NORMALIZE, Normalize
from learning.models import build_model, model_kwargs_for
from learning.state import get_tensors
from protocol.codec import Tensors
from protocol.manifest import InputSpec
from protocol.preprocessing import Normalize as NormalizeStep


def model_spec_for(profile: FirmwareProfile) -> ModelSpec:
    """The global model a device profile asks for: architecture, its arguments, classes, input, preprocessing."""
    kwargs = model_kwargs_for(
        profile.model.architecture, in_channels=profile.input.channels, num_classes=len(profile.model.classes),
        height=profile.input.height, norm=profile.model.norm, width=profile.model.width,
    )
    return ModelSpec(
        architecture=profile.model.architecture, kwargs=kwargs, classes=list(profile.model.classes),
        input=InputSpec(channels=profile.input.channels, height=profile.input.height, width=profile.input.width),
        preprocessing=list(profile.preprocessing),
    )


def spec_normalize(spec: ModelSpec) -> Normalize:
    """Return the ``(mean, std)`` of the model's ``normalize`` preprocessing step.

    That step is what serving applies last; without one, the training default.
    """
    for step in spec.preprocessing:
        if isinstance(step, NormalizeStep):
            return list(step.mean), list(step.std)
    return DEFAULT_NORMALIZE


def initial_weights(spec: ModelSpec, seed: int) -> Callable[[], Tensors]:
    """A maker of ``v0``: the spec's model initialised under ``torch.manual_seed(seed)``."""
    def make() -> Tensors:
        torch.manual_seed(seed)
        return get_tensors(build_model(spec.architecture, **spec.kwargs))

    return make
