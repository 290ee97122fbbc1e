"""The in-process simulation of a ``Federation`` (tests/fedproc.py): what its processes must compute.

``tests/test_sim_equals_runtime.py`` shows the coordinator's round models equal this simulation's
bitwise; other multi-process tests use it as their reference run instead of a second federation of
processes (e.g. the coordinator-SIGKILL test: the crashed run must end with the uninterrupted weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.model_spec import model_spec_for
from coordinator.rounds.settings import downlink_step_codec
from fedscan.experiments import federated
from firmware.profile import find_profile
from learning.datasets import load_medmnist
from protocol.codec import Tensors
from protocol.messages import TrainingConfig


def federation_training(lr: float = 0.02) -> TrainingConfig:
    """What ``fedscan coordinator`` builds from Federation's command line (its defaults: lr 0.02, 1 epoch)."""
    return TrainingConfig(local_epochs=1, batch_size=32, lr=lr, prox_mu=0.0, max_steps=None, loss="balanced_ce")


def simulate_federation(train_path: Path, sites: list[str], parts: list[np.ndarray], rounds: int, *,
                        training: TrainingConfig | None = None, strategy: str = "fedavg", codec: str = "raw",
                        downlink_flag: str | None = None, strategy_args: dict[str, float] | None = None,
                        seed: int = 0) -> list[Tensors]:
    """Each round's global model of ``rounds`` FedAvg-style rounds over ``parts`` of the npz's train split,
    with the uplink ``codec`` and the downlink the coordinator picks for ``--downlink-codec downlink_flag``
    (``None``: the coordinator's default) on the chest X-ray profile."""
    train = load_medmnist(train_path, "train")
    profile = find_profile("xray-cxr-28")
    per_round: list[Tensors] = []
    federated(model_spec_for(profile), train, parts, None, rounds=rounds, training=training or federation_training(),
              strategy=strategy, strategy_args=strategy_args, seed=seed, threads=1, site_names=sites, codec=codec,
              downlink=downlink_step_codec(downlink_flag, profile, codec),
              on_round=lambda w: per_round.append({k: v.copy() for k, v in w.items()}))
    return per_round


def bitwise_diff(a: Tensors, b: Tensors) -> list[str]:
    """Names of the tensors that differ in name order, dtype, shape or any bit."""
    if list(a) != list(b):
        return [f"names differ: {list(a)[:3]} vs {list(b)[:3]}"]
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
