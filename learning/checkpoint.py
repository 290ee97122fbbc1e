"""Training checkpoints: the exact state of an interrupted run, written atomically, matched by fingerprint."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protocol.messages import TrainingConfig

log = logging.getLogger("learning.trainer")

CHECKPOINT_FORMAT = 1


@dataclass
class TrainingCheckpoint:
    """Everything needed to continue a run exactly: weights, optimizer state, position, RNG states.

    ``generator_state`` is the shuffling generator's state at the *start* of ``epoch``; the
    epoch's batch plan is re-drawn from it and ``batch_index`` batches are skipped.
    """

    fingerprint: str
    epoch: int
    batch_index: int
    steps: int
    samples_seen: int
    loss_sum: float
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    generator_state: torch.Tensor
    torch_rng_state: torch.Tensor
    format: int = CHECKPOINT_FORMAT

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file, fsync, rename): a crash leaves the old or the new checkpoint."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with tmp.open("wb") as f:
            torch.save(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | Path) -> TrainingCheckpoint | None:
        """Read the checkpoint at ``path``; None when absent or unreadable (logged)."""
        p = Path(path)
        if not p.exists():
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
            if d.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {d.get('format')} != {CHECKPOINT_FORMAT}")
            return cls(**d)
        except Exception as e:  # a torn or foreign file must not stop training; start over
            log.warning("ignoring unreadable training checkpoint %s: %s", p, e)
            return None


def fingerprint(cfg: TrainingConfig, data_digest: bytes, model: nn.Module, extra: str) -> str:
    """Identify a training run: its config, data digest, start weights and the plug-ins named in ``extra``."""
    h = hashlib.sha256()
    h.update(cfg.model_dump_json().encode())
    h.update(data_digest)
    h.update(extra.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
