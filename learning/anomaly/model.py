"""The disentangled convolutional autoencoder of FedDis, and which of its tensors travel.

Two branches read the same image: a *shape* branch (encoder → code ``z_s`` → decoder) and an
*appearance* branch (``z_a``), whose last feature maps a 1×1 convolution merges into the
reconstruction (sigmoid, images in [0, 1]). This is the layout of Bercea et al.'s FedDis
(two encoder/decoder pairs and a merger); sizes here are small (28×28 / 64×64 inputs) and the
normalization is GroupNorm, fedscan's default (BatchNorm statistics drift between sites).

Sharing (:class:`ShareRule`): under ``feddis`` only the shape branch (``shape_*``) is aggregated;
the appearance branch and the merger (``app_*``, ``merge``) stay on the site — what lets sites
with different scanners share anatomy. Under ``all`` every tensor is averaged: the plain FedAvg
autoencoder baseline, on the same network so the two arms differ only in what travels and in the
latent losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from learning.anomaly.errors import AnomalyError
from learning.state import get_named as get_named  # re-exported: one copy, in learning.state
from learning.state import set_named as state_set_named
from learning.state import travelling_names

SHAPE_PREFIXES = ("shape_enc.", "shape_dec.")
"""Parameter-name prefixes of the shape branch: the part FedDis aggregates."""


class ShareRule(StrEnum):
    """Which tensors of the autoencoder travel to the coordinator."""

    FEDDIS = "feddis"  # shape branch shared; appearance branch + merger kept on the site
    ALL = "all"  # every tensor averaged (plain FedAvg autoencoder)


@dataclass(frozen=True)
class AEConfig:
    """Architecture of the autoencoder.

    Input size (square), channel widths per down-sampling level of each branch, GroupNorm groups
    (must divide every width).
    """

    size: int = 64
    shape_widths: tuple[int, ...] = (16, 32, 64)
    app_widths: tuple[int, ...] = (8, 16, 16)
    groups: int = 4

    def check(self) -> None:
        """Refuse a configuration the network cannot be built with (``AnomalyError``)."""
        levels = len(self.shape_widths)
        if levels < 1 or len(self.app_widths) != levels:
            raise AnomalyError(f"shape and appearance branches need the same number (≥ 1) of levels, got "
                               f"{self.shape_widths} and {self.app_widths}")
        if self.size < 2 ** levels or self.size % (2 ** levels):
            raise AnomalyError(f"input size {self.size} is not divisible by 2^{levels}")
        bad = [w for w in (*self.shape_widths, *self.app_widths) if w < 1 or w % self.groups]
        if bad:
            raise AnomalyError(f"widths {bad} are not positive multiples of groups={self.groups}")


class AEOutput(NamedTuple):
    """Reconstruction ``(B, 1, H, W)`` in [0, 1] and the two latent codes ``(B, C, h, w)``."""

    recon: torch.Tensor
    z_shape: torch.Tensor
    z_app: torch.Tensor


def _encoder(widths: tuple[int, ...], groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.GroupNorm(groups, w), nn.LeakyReLU(0.2)]
        c_in = w
    return nn.Sequential(*layers)


def _decoder(widths: tuple[int, ...], groups: int) -> nn.Sequential:
    outs = [*reversed(widths[:-1]), widths[0]]
    layers: list[nn.Module] = []
    c_in = widths[-1]
    for w in outs:
        layers += [nn.ConvTranspose2d(c_in, w, 4, stride=2, padding=1), nn.GroupNorm(groups, w), nn.LeakyReLU(0.2)]
        c_in = w
    return nn.Sequential(*layers)


class DisentangledAE(nn.Module):
    """Shape and appearance encoder/decoder pairs merged by a 1×1 convolution (see module doc)."""

    def __init__(self, cfg: AEConfig) -> None:
        """Build the network for ``cfg`` (checked first)."""
        cfg.check()
        super().__init__()
        self.cfg = cfg
        self.shape_enc = _encoder(cfg.shape_widths, cfg.groups)
        self.shape_dec = _decoder(cfg.shape_widths, cfg.groups)
        self.app_enc = _encoder(cfg.app_widths, cfg.groups)
        self.app_dec = _decoder(cfg.app_widths, cfg.groups)
        self.merge = nn.Conv2d(cfg.shape_widths[0] + cfg.app_widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> AEOutput:
        """Reconstruct ``x`` ``(B, 1, size, size)`` and return both codes."""
        z_s = self.shape_enc(x)
        z_a = self.app_enc(x)
        feats = torch.cat([self.shape_dec(z_s), self.app_dec(z_a)], dim=1)
        return AEOutput(torch.sigmoid(self.merge(feats)), z_s, z_a)


def build_ae(cfg: AEConfig, *, seed: int | None = None) -> DisentangledAE:
    """A freshly initialised autoencoder (seeded when ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return DisentangledAE(cfg)


def shared_names(model: nn.Module, rule: ShareRule) -> list[str]:
    """Travelling tensors sent to the coordinator under ``rule``, in wire order."""
    names = travelling_names(model)
    if ShareRule(rule) is ShareRule.ALL:
        return names
    return [n for n in names if n.startswith(SHAPE_PREFIXES)]


def local_names(model: nn.Module, rule: ShareRule) -> list[str]:
    """Travelling tensors that stay on the site under ``rule`` (empty for ``all``)."""
    shared = set(shared_names(model, rule))
    return [n for n in travelling_names(model) if n not in shared]


def set_named(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Load some travelling tensors; unknown names, wrong shapes, non-finite values: ``AnomalyError``.

    ``learning.state.set_named`` with this job's error family.
    """
    state_set_named(model, tensors, error=AnomalyError, check_finite=True)
