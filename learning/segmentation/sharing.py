"""Which tensors travel to the coordinator, and which stay on the site, per sharing rule.

- ``fedavg``: every travelling tensor (``learning.state.travelling_names``: trainable parameters
  plus BatchNorm running statistics) is averaged;
- ``fedbn`` (Li et al. 2021, "FedBN"): everything but the normalization layers — their affine
  parameters (and running statistics, for BatchNorm) stay on the site, so each site keeps its own
  feature statistics: the remedy for domain shift between scanners and modalities;
- ``local_head``: everything but the output block (from the last transposed convolution on: the
  top up-sampling step and the output convolution), a personalised head over a shared encoder.

Local tensors are part of the site's state (``learning.segmentation.client.SiteState``): the
coordinator never sees them; the site serves the shared model with its own local tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import numpy as np
from torch import nn

from learning.segmentation.errors import SegmentationError
from learning.segmentation.model import is_norm
from learning.state import get_named as get_named  # re-exported: one copy, in learning.state
from learning.state import set_named as state_set_named
from learning.state import travelling_names


class ShareRule(StrEnum):
    """How a site's model splits into shared and local tensors."""

    FEDAVG = "fedavg"
    FEDBN = "fedbn"
    LOCAL_HEAD = "local_head"


def _owned_by(model: nn.Module, pick: list[str]) -> set[str]:
    """Names of every parameter / buffer of the modules named in ``pick`` (recursively)."""
    mods = dict(model.named_modules())
    out: set[str] = set()
    for prefix in pick:
        module = mods[prefix]
        stem = f"{prefix}." if prefix else ""
        out |= {stem + n for n, _ in module.named_parameters()}
        out |= {stem + n for n, _ in module.named_buffers()}
    return out


def norm_names(model: nn.Module) -> set[str]:
    """Parameters and buffers of the model's normalization layers."""
    return _owned_by(model, [n for n, m in model.named_modules() if is_norm(m)])


def head_names(model: nn.Module) -> set[str]:
    """Parameters and buffers registered from the last transposed convolution on (the output block)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)]
    if not names:
        raise SegmentationError("local_head needs a model with a transposed-convolution output block")
    leaves = [n for n, m in model.named_modules() if not list(m.children())]
    start = leaves.index(names[-1])
    return _owned_by(model, leaves[start:])


def local_names(model: nn.Module, rule: ShareRule) -> list[str]:
    """Travelling tensors that stay on the site under ``rule``, in wire order."""
    rule = ShareRule(rule)
    if rule is ShareRule.FEDAVG:
        keep: set[str] = set()
    elif rule is ShareRule.FEDBN:
        keep = norm_names(model)
    else:
        keep = head_names(model)
    return [n for n in travelling_names(model) if n in keep]


def shared_names(model: nn.Module, rule: ShareRule) -> list[str]:
    """Travelling tensors sent to the coordinator under ``rule``, in wire order."""
    local = set(local_names(model, rule))
    return [n for n in travelling_names(model) if n not in local]


def set_named(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Load some travelling tensors into ``model``; unknown names, wrong shapes: ``SegmentationError``.

    ``learning.state.set_named`` with this job's error family.
    """
    state_set_named(model, tensors, error=SegmentationError)
