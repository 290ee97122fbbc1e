"""The simulation is the runtime (issue 14 item 9): what a bench measures in one process holds for the product.

Two FedAvg rounds over the same three sites (same data partition, seeds, training config and
uplink codec) are run twice:

* in-process, by ``fedscan.experiments.federated`` (what ``bench/federated.py``,
  ``bench/compression.py``, ``bench/robustness.py`` and the demo's baselines run), and
* as real processes: one coordinator and three agents (``python -m fedscan``) over a real
  mosquitto, the agents training in their own interpreters from the models they downloaded.

Both go through one local-update function (``learning.local_update.local_update``), and the
coordinator closes a round with its updates sorted by agent id, as the simulation does; so the
coordinator's aggregated weights of both rounds must equal the simulation's **bitwise**: every
process trains with one torch thread on CPU, the uplink codec is seeded per site and round (its
error-feedback state kept per site in both), the downlink is what the coordinator picks for that
codec (compressed steps from the parent, seeded by the round, for a lossy uplink; exact ``xor|zstd``
for a lossless one) and the simulation publishes the same steps, and FedAvg sums in the same order (one float64 accumulator). No tolerance is needed, and none is allowed.
A control shows the comparison is sharp: the same simulation with the sites' names swapped
(hence their seeds) does not match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedproc import Federation, stratified_parts, wait_for
from mqtt_broker import Broker
from simref import bitwise_diff, federation_training, simulate_federation

from coordinator.model_repo import ModelRepository
from coordinator.rounds import round_training
from coordinator.store import open_store
from coordinator.strategies import build_strategy
from learning.datasets import load_medmnist
from learning.recipe import STRATEGY, STRATEGY_ARGS, default_training
from protocol.codec import Tensors
from protocol.messages import TrainingConfig

pytestmark = pytest.mark.integration

SIZES = [96, 128, 160]  # unequal, so FedAvg's sample weights matter (none is capped: all within 4x the median)
ROUNDS = 2
DOWNLINK = "auto"  # opt-in compressed model steps with a lossy uplink: the step path is covered too
LR = 0.02  # Federation's default --lr; the CLI's defaults for the rest (batch 32, ce, 1 local epoch)
CODEC = os.environ.get("FEDSCAN_SIM_CODEC", "delta|topk:0.1|ef|q:8|zstd")
"""The uplink codec of both runs: lossy, seeded and stateful (top-k with error feedback, 8-bit stochastic
quantization), so the agents' codec seeds and their error-feedback state, saved to disk between rounds,
must match the simulation's too. ``FEDSCAN_SIM_CODEC=raw`` runs the default product codec (passes too)."""


def _training() -> TrainingConfig:
    """What ``fedscan coordinator`` builds from Federation's command line."""
    return federation_training(LR)


def _simulate(train_path: Path, sites: list[str], parts: list[np.ndarray], rounds: int = ROUNDS, *,
              training: TrainingConfig | None = None, strategy: str = "fedavg", codec: str = CODEC,
              strategy_args: dict[str, float] | None = None) -> list[Tensors]:
    # the downlink the coordinator picks for ``--downlink-codec auto`` and this uplink codec (compressed
    # steps once the uplink is lossy, exact for a lossless one): the simulation publishes the same models
    return simulate_federation(train_path, sites, parts, rounds, training=training or _training(), strategy=strategy,
                               codec=codec, downlink_flag=DOWNLINK, strategy_args=strategy_args)


def _run_agent_processes(tmp_path: Path, broker: Broker, npz: Path, coordinator_args: list[str]
                         ) -> tuple[Federation, list[np.ndarray], list[Any], dict[int, list[tuple[str, int]]]]:
    """Run ROUNDS rounds with a coordinator and the SIZES agents as processes; return the federation, the
    agents' index shares, the round records and each round's (agent, sample count) updates."""
    labels = load_medmnist(npz, "train").labels
    # plain interpreters, not forks of a pre-imported one: this is the test that the product's own
    # process start computes what the simulation computes
    fed = Federation(tmp_path, broker.port, npz, sizes=SIZES, rounds=ROUNDS, lr=LR, forked=False,
                     extra_coordinator_args=coordinator_args)
    fed.prepare(labels).close()
    parts = stratified_parts(labels, SIZES, fed.seed)  # what prepare() gave each agent (indices.npy)
    fed.start_all()
    try:
        store = open_store(f"sqlite:///{fed.state / 'state.db'}")
        try:
            wait_for(lambda: (r := store.get_round(ROUNDS)) is not None and r.status == "complete", 300,
                     f"round {ROUNDS} to complete", fed)
            rounds = [store.get_round(r) for r in range(1, ROUNDS + 1)]
            updates = {r: sorted((u.agent_id, u.sample_count) for u in store.list_updates(r))
                       for r in range(1, ROUNDS + 1)}
        finally:
            store.close()
    finally:
        fed.stop()
    return fed, parts, rounds, updates


def test_in_process_rounds_equal_agent_processes_over_mqtt_bitwise(tmp_path: Path, broker: Broker,
                                                                    pneumonia_npz: Path) -> None:
    fed, parts, rounds, updates = _run_agent_processes(
        tmp_path, broker, pneumonia_npz,
        ["--no-export", "--strategy", "fedavg", "--codec", CODEC, "--downlink-codec", DOWNLINK])

    # the runtime ran what the simulation runs: the announced config, every site, its real size, none capped
    strategy = build_strategy("fedavg")
    for r, rec in enumerate(rounds, start=1):
        assert rec is not None and rec.status == "complete" and rec.result_version == f"v{r}"
        assert rec.config == round_training(_training(), strategy, 0, r).model_dump(), "announced config differs"
        assert updates[r] == sorted(zip(fed.sites, SIZES, strict=True))
        assert rec.detail is not None and rec.detail["aggregation"]["capped"] == []

    repo = ModelRepository(fed.state / "models")
    runtime = [repo.tensors(f"v{r}") for r in range(1, ROUNDS + 1)]
    simulated = _simulate(pneumonia_npz, fed.sites, parts)
    assert len(simulated) == ROUNDS
    assert bitwise_diff(runtime[0], repo.tensors("v0")), "round 1 must change the model"
    for r in range(ROUNDS):
        assert bitwise_diff(simulated[r], runtime[r]) == [], f"round {r + 1}: simulation != runtime"

    # control: the comparison is sharp enough to see one site's seed and data change hands
    swapped = [fed.sites[1], fed.sites[0], fed.sites[2]]
    assert bitwise_diff(_simulate(pneumonia_npz, swapped, parts, rounds=1)[0], runtime[0]) != []


RECIPE_STEPS = 3


def test_default_recipe_with_server_momentum_equals_agent_processes_bitwise(tmp_path: Path, broker: Broker,
                                                                            pneumonia_npz: Path) -> None:
    """``--recipe default`` (what bench/melanoma.py and bench/defaults.py measure in process): a step budget,
    warm-up + cosine schedule, class-balanced loss and FedAvgM's server momentum, whose velocity the
    coordinator keeps between rounds: the runtime's round models equal the simulation's bitwise too."""
    fed, parts, rounds, _ = _run_agent_processes(
        tmp_path, broker, pneumonia_npz,
        ["--no-export", "--recipe", "default", "--steps-per-round", str(RECIPE_STEPS), "--codec", "raw"])
    configs = [rec.config for rec in rounds if rec is not None]
    training = default_training(ROUNDS, RECIPE_STEPS)
    assert configs == [round_training(training, build_strategy(STRATEGY, **STRATEGY_ARGS), 0, r).model_dump()
                       for r in range(1, ROUNDS + 1)], "the coordinator announced another recipe"
    repo = ModelRepository(fed.state / "models")
    runtime = [repo.tensors(f"v{r}") for r in range(1, ROUNDS + 1)]
    simulated = _simulate(pneumonia_npz, fed.sites, parts, training=training, strategy=STRATEGY, codec="raw",
                          strategy_args=dict(STRATEGY_ARGS))
    for r in range(ROUNDS):
        assert bitwise_diff(simulated[r], runtime[r]) == [], f"round {r + 1}: simulation != runtime"
    # control: FedAvgM's usual momentum (0.9) is not what the recipe's coordinator ran
    usual = _simulate(pneumonia_npz, fed.sites, parts, training=training, strategy=STRATEGY, codec="raw",
                      strategy_args={"momentum": 0.9})
    assert bitwise_diff(usual[1], runtime[1]) != []
    # control: without the server momentum the second round differs (the velocity is part of the state)
    plain = _simulate(pneumonia_npz, fed.sites, parts, training=training, strategy="fedavg", codec="raw")
    assert bitwise_diff(plain[1], runtime[1]) != []
