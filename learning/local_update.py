"""One site's local update in one round: the single function both the runtime and the simulation train through.

The agent's training job (``edge_agent/training_job.py``) and the in-process federation of the
benchmarks and the demo's baselines (``fedscan/experiments.py``) both call :func:`local_update`:
the round's training config (as the coordinator announces it, ``coordinator.rounds.round_training``)
gets the site's own seed (:func:`site_seed`), the model starts from the round's global weights
and is trained by :func:`learning.trainer.train_local` with the global weights as the FedProx
anchor. What differs between the two callers is only I/O around it (the agent downloads the base
model, checkpoints, pauses for diagnosis and encodes the frame; pausing and checkpoints do not
change the weights, see ``learning/trainer.py``). ``tests/test_sim_equals_runtime.py`` shows the
coordinator's aggregated weights are bitwise equal either way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from learning.augment import Augment
from learning.datasets import DEFAULT_NORMALIZE, Normalize
from learning.state import get_tensors
from learning.trainer import PauseHook, Progress, TrainData, TrainResult, train_local
from protocol.codec import Tensors
from protocol.messages import TrainingConfig


def site_seed(round_seed: int, site: str) -> int:
    """Return the local training seed of one site in one round: distinct per site, reproducible."""
    return (round_seed * 1_000_003 + int(hashlib.sha256(site.encode()).hexdigest()[:8], 16)) % (2**31)


def site_config(round_cfg: TrainingConfig, site: str) -> TrainingConfig:
    """Return the round's training config with ``site``'s own seed (what that site trains with)."""
    return round_cfg.model_copy(update={"seed": site_seed(round_cfg.seed, site)})


@dataclass(frozen=True)
class LocalUpdate:
    """What one local update produced: the site's trained model, the trainer's report, the config used."""

    tensors: Tensors
    result: TrainResult
    cfg: TrainingConfig


def local_update(
    model: nn.Module,
    base: Tensors,
    data: TrainData,
    round_cfg: TrainingConfig,
    site: str,
    *,
    threads: int | None = None,
    pause: PauseHook | None = None,
    checkpoint_path: str | Path | None = None,
    progress: Progress | None = None,
    augment: Augment | None = None,
    normalize: Normalize | None = DEFAULT_NORMALIZE,
) -> LocalUpdate:
    """Train ``model`` (already holding ``base``, the round's global weights) on ``site``'s ``data``.

    ``round_cfg`` is the round's config as announced to every site; the site's seed is derived
    here, so callers cannot drift apart. ``pause``/``checkpoint_path``/``progress`` are the
    agent's hooks and leave the result unchanged; ``augment`` is the device profile's training
    augmentation (applied when ``round_cfg.augment``); ``normalize`` the profile's ``(mean, std)``.
    """
    cfg = site_config(round_cfg, site)
    result = train_local(model, data, cfg, global_tensors=base, threads=threads, pause=pause,
                         checkpoint_path=checkpoint_path, progress=progress, augment=augment,
                         normalize=normalize)
    return LocalUpdate(get_tensors(model), result, cfg)
