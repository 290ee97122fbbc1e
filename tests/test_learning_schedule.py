"""Step budget, learning-rate schedule, optimizer choice and augmentation inside the training loop."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from coordinator.rounds import round_training
from coordinator.strategies import build_strategy
from learning.datasets import make_synthetic
from learning.models import build_model
from learning.schedule import lr_factor, make_optimizer, schedule_total
from learning.trainer import augment_seed, train_local
from protocol.messages import TrainingConfig

DATA = make_synthetic(64, seed=0)


def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", width=4)


def test_lr_factor_warmup_then_half_cosine() -> None:
    assert [lr_factor(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4) == 1.0
    assert lr_factor(52, 100, 4) == pytest.approx(0.5)
    assert lr_factor(99, 100, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 95 / 96)))
    assert lr_factor(150, 100, 4) == 0.0  # past the budget: stays at the floor
    assert lr_factor(7, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 10, 0, "step")
    with pytest.raises(ValueError, match="total >= 1"):
        lr_factor(0, 0)


def test_schedule_total_and_optimizer_choice() -> None:
    cfg = TrainingConfig(max_steps=10)
    assert schedule_total(cfg, 10) == 10
    assert schedule_total(cfg.model_copy(update={"total_steps": 200, "step_offset": 30}), 10) == 200
    assert schedule_total(cfg.model_copy(update={"step_offset": 30}), 10) == 40
    assert isinstance(make_optimizer(model(), cfg), torch.optim.SGD)
    adamw = make_optimizer(model(), cfg.model_copy(update={"optimizer": "adamw", "weight_decay": 0.05}))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


def lrs_of(cfg: TrainingConfig) -> list[float]:
    """The learning rate each step of a call used (read after the step)."""
    seen: list[float] = []
    holder: dict[str, torch.optim.Optimizer] = {}

    def factory(m: nn.Module, c: TrainingConfig) -> torch.optim.Optimizer:
        holder["opt"] = make_optimizer(m, c)
        return holder["opt"]

    train_local(model(), DATA, cfg, threads=1, optimizer_factory=factory,
                progress=lambda s, p, loss: seen.append(float(holder["opt"].param_groups[0]["lr"])))
    return seen


def test_trainer_follows_the_schedule_across_rounds() -> None:
    base = TrainingConfig(batch_size=16, lr=0.1, local_epochs=100, max_steps=6, schedule="cosine", warmup_steps=3,
                          total_steps=12)
    first = lrs_of(base)
    second = lrs_of(base.model_copy(update={"step_offset": 6}))
    want = [0.1 * lr_factor(s, 12, 3) for s in range(12)]
    assert first + second == pytest.approx(want)
    assert lrs_of(base.model_copy(update={"schedule": "constant"})) == [0.1] * 6  # old behaviour


def test_round_training_offsets_the_schedule_by_round() -> None:
    strat = build_strategy("fedavg")
    cfg = TrainingConfig(max_steps=25, schedule="cosine", total_steps=250)
    assert round_training(cfg, strat, 0, 1).step_offset == 0
    assert round_training(cfg, strat, 0, 4).step_offset == 75
    assert round_training(TrainingConfig(max_steps=25), strat, 0, 4).step_offset == 0  # constant: untouched


def test_augmentation_runs_only_when_asked_with_step_seeds(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[int, float, float]] = []

    def augment(x: torch.Tensor, seed: int) -> torch.Tensor:
        calls.append((seed, float(x.min()), float(x.max())))
        return torch.flip(x, dims=(3,))

    cfg = TrainingConfig(batch_size=16, lr=0.05, local_epochs=100, max_steps=5, seed=9, step_offset=20)
    plain = model()
    train_local(plain, DATA, cfg, threads=1, augment=augment)
    assert calls == []  # cfg.augment is off
    flipped = model()
    train_local(flipped, DATA, cfg.model_copy(update={"augment": True}), threads=1, augment=augment)
    assert [c[0] for c in calls] == [augment_seed(9, 20 + s) for s in range(5)]
    assert all(lo >= 0.0 and hi <= 1.0 for _, lo, hi in calls)  # pixels in [0, 1], before normalization
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), flipped.state_dict().values(),
                                                       strict=True))
    calls.clear()
    x, y = DATA.batch()
    with caplog.at_level(logging.WARNING, logger="learning.trainer"):
        train_local(model(), (x, y), cfg.model_copy(update={"augment": True}), threads=1, augment=augment)
    assert calls == [] and "augmentation skipped" in caplog.text


def test_old_senders_config_still_parses_with_the_old_defaults() -> None:
    old = TrainingConfig.model_validate({"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9})
    assert (old.optimizer, old.schedule, old.warmup_steps, old.total_steps, old.step_offset, old.augment) == (
        "sgd", "constant", 0, None, 0, False)
