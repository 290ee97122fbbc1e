"""Local training loop: a step budget with a learning-rate schedule, deterministic, pausable and resumable.

Used by every agent and by the centralized / single-site baselines. The parts live beside it:
``learning/pause.py`` (the pause switch), ``learning/checkpoint.py`` (checkpoints),
``learning/losses.py`` (cross-entropy variants), ``learning/schedule.py`` (optimizers and the
learning-rate schedule), ``learning/augment.py`` (training augmentation).

Work per call: ``cfg.local_epochs`` epochs, capped at ``cfg.max_steps`` optimizer steps. With a
step budget (``max_steps`` and enough epochs to reach it) every site takes the same number of
steps whatever its size. ``cfg.schedule="cosine"`` sets the learning rate of global step
``cfg.step_offset + s`` from the schedule over ``cfg.total_steps``; ``cfg.optimizer`` picks SGD
(momentum) or AdamW; ``cfg.augment`` applies the ``augment`` callable (the device profile's
augmentation) to each batch of an :class:`ArrayDataset` in [0, 1], before normalization.

Determinism: shuffling uses a private ``torch.Generator`` seeded from ``cfg.seed``; the global
torch RNG (dropout, if a model has any) is seeded from ``cfg.seed`` inside ``fork_rng`` so the
caller's RNG is untouched; augmentation is seeded from ``cfg.seed`` and the global step. Same
seed + same start weights + same thread count ⇒ bit-identical weights on CPU, also across a
pause or a restart from a checkpoint.

Pause/resume: before each batch the loop asks ``pause.paused``; when set it writes a checkpoint
(if ``checkpoint_path``) and blocks in ``pause.wait_if_paused()`` (``cancel()`` makes that raise
:class:`TrainingCancelled`; the checkpoint stays, so a later call resumes). A checkpoint is also
written at the end of each epoch and when ``max_steps`` ends training. A checkpoint is resumed
only when its fingerprint (config, dataset, start weights) matches this call; a finished one
makes the call return at once with the trained weights loaded.

DP-SGD (``learning/dp.py``) plugs in through ``optimizer_factory`` and ``batch_plan``::

    pt = make_private(model, sgd_optimizer(model, cfg), loader, noise_multiplier=..., max_grad_norm=...)
    train_local(pt.model, data, cfg, optimizer_factory=lambda m, c: pt.optimizer,
                batch_plan=poisson_batches(pt.sample_rate))

This module implements no privacy itself. A DP run resumed from a checkpoint is not
bit-identical (the noise generator's state is the optimizer's, not checkpointed here).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from learning.augment import Augment
from learning.checkpoint import CHECKPOINT_FORMAT, TrainingCheckpoint, fingerprint
from learning.datasets import DEFAULT_NORMALIZE, ArrayDataset, Normalize, normalize_tensor
from learning.losses import LossFn, balanced_class_weights, class_balanced_loss, weighted_cross_entropy
from learning.pause import PauseHook, TrainingCancelled
from learning.schedule import lr_factor, make_optimizer, schedule_total, sgd_optimizer
from protocol.messages import TrainingConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "BatchPlan",
    "LossFn",
    "OptimizerFactory",
    "PauseHook",
    "Progress",
    "TrainData",
    "TrainResult",
    "TrainingCancelled",
    "TrainingCheckpoint",
    "balanced_class_weights",
    "class_balanced_loss",
    "poisson_batches",
    "sgd_optimizer",
    "shuffled_batches",
    "train_local",
    "weighted_cross_entropy",
]

log = logging.getLogger(__name__)

BatchGetter = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
BatchPlan = Callable[[int, int, torch.Generator], list[np.ndarray]]
"""``(n, batch_size, generator) -> index arrays for one epoch``; must draw only from ``generator``."""
OptimizerFactory = Callable[[nn.Module, TrainingConfig], torch.optim.Optimizer]
Progress = Callable[[int, int, float], None]
"""``(steps_done, steps_planned, batch_loss)`` after every step."""
TrainData = ArrayDataset | TensorDataset | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    """What one :func:`train_local` call did."""

    steps: int
    samples_seen: int
    loss: float  # mean training loss (without the proximal term) over all steps of the run
    seconds: float  # wall time of this call
    epochs: int = 0  # epochs completed
    resumed_from_step: int = 0  # > 0 when this call resumed a checkpoint


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """Default batch plan: one ``randperm`` per epoch, consecutive slices (last one may be short)."""
    perm = torch.randperm(n, generator=generator).numpy()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def poisson_batches(sample_rate: float) -> BatchPlan:
    """Batch plan for DP-SGD (opacus' Poisson sampling).

    ``round(1 / sample_rate)`` steps per epoch, each sample in a step's batch independently with
    probability ``sample_rate``. Empty batches are skipped by the loop (no update is released for them).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")

    def plan(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
        steps = max(1, round(1 / sample_rate))
        return [torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().numpy()
                for _ in range(steps)]

    return plan


def augment_seed(seed: int, global_step: int) -> int:
    """Return the augmentation seed of one step: a function of the run's seed and the step alone."""
    return (seed * 1_000_003 + global_step) % (2**32)


def _loss_from_config(cfg: TrainingConfig, data: TrainData) -> LossFn:
    """``cfg.loss``: plain cross-entropy, or class-balanced over this site's own label counts."""
    if cfg.loss == "ce":
        return F.cross_entropy
    if isinstance(data, ArrayDataset):
        labels, num_classes = data.labels, data.num_classes
    else:
        ys = data.tensors[1] if isinstance(data, TensorDataset) else data[1]
        labels = ys.cpu().numpy()
        num_classes = int(labels.max()) + 1 if labels.size else 1
    return class_balanced_loss(labels, num_classes)


@dataclass(frozen=True)
class _Source:
    """Batches of a dataset: ``get`` gives inputs before normalization, ``finish`` normalizes them."""

    n: int
    get: BatchGetter
    finish: Callable[[torch.Tensor], torch.Tensor]
    digest: Callable[[], bytes]
    unit_range: bool  # inputs from ``get`` are pixels in [0, 1] (augmentation applies)


def _batch_source(data: TrainData, normalize: Normalize | None) -> _Source:
    if isinstance(data, ArrayDataset):

        def digest_arrays() -> bytes:
            h = hashlib.blake2b(digest_size=16)
            h.update(repr((data.images.shape, str(data.images.dtype), normalize)).encode())
            h.update(np.ascontiguousarray(data.images).tobytes())
            h.update(data.labels.tobytes())
            return h.digest()

        return _Source(len(data), lambda idx: data.batch(idx, None), lambda x: normalize_tensor(x, normalize),
                       digest_arrays, True)
    xs, ys = data.tensors if isinstance(data, TensorDataset) else data
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"{xs.shape[0]} inputs but {ys.shape[0]} labels")

    def digest_tensors() -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for t in (xs, ys):
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    def get(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.from_numpy(idx)
        return xs[i], ys[i]

    return _Source(int(ys.shape[0]), get, lambda x: x, digest_tensors, False)


def _prox_pairs(model: nn.Module, cfg: TrainingConfig, global_tensors: Mapping[str, np.ndarray] | None,
                device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if cfg.prox_mu <= 0:
        return []
    if global_tensors is None:
        raise ValueError("cfg.prox_mu > 0 needs global_tensors (the round's global weights)")
    params = dict(model.named_parameters())
    missing = [k for k in params if params[k].requires_grad and k not in global_tensors]
    if missing:
        raise ValueError(f"global_tensors lack parameters {missing[:5]}")
    return [(p, torch.as_tensor(np.asarray(global_tensors[k]), dtype=p.dtype, device=device))
            for k, p in params.items() if p.requires_grad]


def train_local(
    model: nn.Module,
    dataset: TrainData,
    cfg: TrainingConfig,
    *,
    global_tensors: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    pause: PauseHook | None = None,
    checkpoint_path: str | Path | None = None,
    progress: Progress | None = None,
    normalize: Normalize | None = DEFAULT_NORMALIZE,
    optimizer_factory: OptimizerFactory | None = None,
    batch_plan: BatchPlan | None = None,
    loss_fn: LossFn | None = None,
    augment: Augment | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` (at most ``cfg.max_steps`` steps).

    ``global_tensors`` (the round's global weights by parameter name, as from
    :func:`learning.state.get_tensors`) anchor the FedProx term ``(mu/2)·||w − w_g||²`` when
    ``cfg.prox_mu > 0``. ``normalize`` applies to an :class:`ArrayDataset`; tensors are used as given.
    ``augment`` (e.g. :class:`learning.augment.BatchAugment`) runs on each batch when ``cfg.augment``;
    tensor inputs are already normalized, so they are not augmented (logged).
    ``threads`` sets ``torch.set_num_threads`` for the call (process-wide; restored after).
    The optimizer is ``optimizer_factory(model, cfg)`` (default :func:`learning.schedule.make_optimizer`);
    with a schedule, each group's learning rate is its initial one times :func:`learning.schedule.lr_factor`.
    """
    t0 = time.perf_counter()
    src = _batch_source(dataset, normalize)
    if src.n == 0:
        raise ValueError("cannot train on an empty dataset")
    plan_fn = batch_plan or shuffled_batches
    make_opt = optimizer_factory or make_optimizer
    criterion = loss_fn or _loss_from_config(cfg, dataset)
    device = next(model.parameters()).device
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    prox = _prox_pairs(model, cfg, global_tensors, device)
    aug = augment if cfg.augment else None
    if aug is not None and not src.unit_range:
        log.warning("augmentation skipped: tensor inputs are already normalized (augment ArrayDataset pixels)")
        aug = None

    old_threads = torch.get_num_threads()
    was_training = model.training
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            optimizer = make_opt(model, cfg)
            base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
            ck_path = Path(checkpoint_path) if checkpoint_path is not None else None
            fp = ""
            if ck_path is not None:
                extra = (f"{getattr(plan_fn, '__qualname__', plan_fn)}|{type(optimizer).__qualname__}|{has_bn}"
                         f"|{getattr(aug, 'spec', aug)!r}")
                fp = fingerprint(cfg, src.digest(), model, extra)

            epoch = batch_index = steps = samples = 0
            loss_sum = 0.0
            resumed_from = 0
            ck = TrainingCheckpoint.load(ck_path) if ck_path is not None else None
            if ck is not None and ck.fingerprint != fp:
                log.info("training checkpoint %s belongs to another run; starting fresh", ck_path)
                ck = None
            if ck is not None:
                model.load_state_dict(ck.model_state)
                optimizer.load_state_dict(ck.optimizer_state)
                gen.set_state(ck.generator_state)
                torch.set_rng_state(ck.torch_rng_state)
                epoch, batch_index, steps = ck.epoch, ck.batch_index, ck.steps
                samples, loss_sum = ck.samples_seen, ck.loss_sum
                resumed_from = steps
                log.info("resuming training at epoch %d batch %d (step %d)", epoch, batch_index, steps)

            max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
            planned = int(min(max_steps, cfg.local_epochs * math.ceil(src.n / cfg.batch_size)))
            total = schedule_total(cfg, planned)
            saved_at = steps if ck is not None else -1  # the file on disk already holds this position

            def save(ep: int, b: int, gen_state: torch.Tensor) -> None:
                nonlocal saved_at
                if ck_path is None or saved_at == steps:
                    return
                saved_at = steps
                TrainingCheckpoint(
                    fingerprint=fp, epoch=ep, batch_index=b, steps=steps, samples_seen=samples,
                    loss_sum=loss_sum, model_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                    optimizer_state=optimizer.state_dict(), generator_state=gen_state,
                    torch_rng_state=torch.get_rng_state(),
                ).save(ck_path)

            model.train()
            while epoch < cfg.local_epochs and steps < max_steps:
                epoch_start_state = gen.get_state()
                batches = plan_fn(src.n, cfg.batch_size, gen)
                for b in range(batch_index, len(batches)):
                    if steps >= max_steps:
                        break
                    if pause is not None and pause.paused:
                        save(epoch, b, epoch_start_state)
                        pause.wait_if_paused()
                    idx = batches[b]
                    if len(idx) == 0 or (has_bn and len(idx) == 1):
                        continue  # BatchNorm cannot train on one sample
                    x, y = src.get(idx)
                    global_step = cfg.step_offset + steps
                    if aug is not None:
                        x = aug(x, augment_seed(cfg.seed, global_step))
                    x, y = src.finish(x).to(device), y.to(device)
                    if cfg.schedule != "constant":
                        factor = lr_factor(global_step, total, cfg.warmup_steps, cfg.schedule)
                        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                            group["lr"] = base * factor
                    optimizer.zero_grad(set_to_none=True)
                    data_loss = criterion(model(x), y)
                    loss = data_loss
                    if prox:
                        sq = torch.stack([(p - g).pow(2).sum() for p, g in prox]).sum()
                        loss = data_loss + 0.5 * cfg.prox_mu * sq
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                    steps += 1
                    samples += len(idx)
                    value = float(data_loss.detach())
                    loss_sum += value
                    if progress is not None:
                        progress(steps, planned, value)
                else:
                    epoch += 1
                    batch_index = 0
                    save(epoch, 0, gen.get_state())
                    continue
                # max_steps reached inside the epoch
                save(epoch, b, epoch_start_state)
                break
    finally:
        model.train(was_training)
        if threads is not None:
            torch.set_num_threads(old_threads)
    return TrainResult(
        steps=steps,
        samples_seen=samples,
        loss=loss_sum / steps if steps else float("nan"),
        seconds=time.perf_counter() - t0,
        epochs=epoch,
        resumed_from_step=resumed_from,
    )
