"""Local training loop: SGD (+ FedProx term), deterministic, pausable and resumable at batch boundaries.

Used by every agent and by the centralized / single-site baselines.

Determinism: shuffling uses a private ``torch.Generator`` seeded from ``cfg.seed``; the global
torch RNG (dropout, if a model has any) is seeded from ``cfg.seed`` inside ``fork_rng`` so the
caller's RNG is untouched. Same seed + same start weights + same thread count ⇒ bit-identical
weights on CPU, also across a pause or a restart from a checkpoint.

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
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from learning.datasets import DEFAULT_NORMALIZE, ArrayDataset, Normalize
from protocol.messages import TrainingConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

BatchGetter = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
BatchPlan = Callable[[int, int, torch.Generator], list[np.ndarray]]
"""``(n, batch_size, generator) -> index arrays for one epoch``; must draw only from ``generator``."""
OptimizerFactory = Callable[[nn.Module, TrainingConfig], torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, float], None]
"""``(steps_done, steps_planned, batch_loss)`` after every step."""


class TrainingCancelled(RuntimeError):
    """Raised from :meth:`PauseHook.wait_if_paused` after :meth:`PauseHook.cancel`."""


class PauseHook:
    """Cooperative pause switch checked by the training loop before every batch.

    Paused when :meth:`pause` was called (until :meth:`resume`) or when the optional
    ``should_pause()`` predicate returns True (polled every ``poll_s`` while waiting), e.g.
    "an inference request is queued" or "GPU above its temperature gate". Thread-safe.
    """

    def __init__(self, should_pause: Callable[[], bool] | None = None, *, poll_s: float = 0.05) -> None:
        self._should_pause = should_pause
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._manual = False
        self._cancelled = False
        self.pauses = 0  # how many times the loop actually waited

    def pause(self) -> None:
        with self._cond:
            self._manual = True

    def resume(self) -> None:
        with self._cond:
            self._manual = False
            self._cond.notify_all()

    def cancel(self) -> None:
        """Make the waiting (or next) :meth:`wait_if_paused` raise :class:`TrainingCancelled`."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def paused(self) -> bool:
        return self._manual or self._cancelled or bool(self._should_pause and self._should_pause())

    def wait_if_paused(self, timeout: float | None = None) -> float:
        """Block while paused; return seconds waited. Raises :class:`TrainingCancelled` when cancelled,
        ``TimeoutError`` when still paused after ``timeout`` seconds."""
        t0 = time.monotonic()
        waited = False
        with self._cond:
            while True:
                if self._cancelled:
                    raise TrainingCancelled("training cancelled while paused")
                if not (self._manual or (self._should_pause and self._should_pause())):
                    break
                waited = True
                left = None if timeout is None else timeout - (time.monotonic() - t0)
                if left is not None and left <= 0:
                    raise TimeoutError(f"still paused after {timeout} s")
                step = self._poll_s if self._should_pause else None
                self._cond.wait(step if left is None else min(left, step or left))
        if waited:
            self.pauses += 1
        return time.monotonic() - t0


@dataclass(frozen=True)
class TrainResult:
    steps: int
    samples_seen: int
    loss: float  # mean training loss (without the proximal term) over all steps of the run
    seconds: float  # wall time of this call
    epochs: int = 0  # epochs completed
    resumed_from_step: int = 0  # > 0 when this call resumed a checkpoint


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
        """The checkpoint at ``path``, or None when absent or unreadable (logged)."""
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


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """Default batch plan: one ``randperm`` per epoch, consecutive slices (last one may be short)."""
    perm = torch.randperm(n, generator=generator).numpy()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def poisson_batches(sample_rate: float) -> BatchPlan:
    """Batch plan for DP-SGD: ``round(1 / sample_rate)`` steps per epoch, each sample in a step's batch
    independently with probability ``sample_rate`` (opacus' Poisson sampling). Empty batches are
    skipped by the loop (no update is released for them)."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")

    def plan(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
        steps = max(1, round(1 / sample_rate))
        return [torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().numpy()
                for _ in range(steps)]

    return plan


def sgd_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``n / (C · count_c)`` per class (sklearn's "balanced"); 1 for classes absent from ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def class_balanced_loss(labels: np.ndarray, num_classes: int) -> LossFn:
    """Cross-entropy weighted ``n / (C · count_c)`` per class (sklearn's "balanced"); for label-skewed sites.

    Not for DP-SGD: ``F.cross_entropy(weight=)`` divides by the batch's total weight, which couples
    the samples of a batch, and the weights come from the site's private labels. Use
    :func:`weighted_cross_entropy` with public weights there."""
    weight = torch.tensor(balanced_class_weights(labels, num_classes), dtype=torch.float32)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=weight.to(logits.device))

    return loss


def weighted_cross_entropy(class_weights: Sequence[float] | np.ndarray) -> LossFn:
    """``mean_i(w[y_i] · CE_i)``: cross-entropy with fixed class weights, a plain mean of per-sample terms.

    Unlike ``F.cross_entropy(weight=w)`` (which divides by ``Σ_i w[y_i]`` of the batch) each sample's
    term depends on that sample alone, so opacus' per-sample gradients (``loss_reduction="mean"``:
    the batch mean's gradient times the batch size) are exactly ``w[y_i] · ∇CE_i`` and per-sample
    clipping bounds each record's influence. For DP-SGD the weights must be public (fixed in the
    task, or from the coordinator's own data), not computed from the site's records. Note that
    clipping caps ``w[y_i] · ‖∇CE_i‖`` at the clip norm: a weight only acts on samples whose
    weighted gradient stays below it."""
    weight = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
    if weight.ndim != 1 or not bool(torch.all(weight > 0)) or not bool(torch.all(torch.isfinite(weight))):
        raise ValueError(f"class weights must be a 1-d array of finite positive numbers, got {class_weights!r}")

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, y, reduction="none")
        return (weight.to(logits.device)[y] * per_sample).mean()

    return loss


TrainData = ArrayDataset | TensorDataset | tuple[torch.Tensor, torch.Tensor]


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


def _batch_source(data: TrainData, normalize: Normalize | None) -> tuple[int, BatchGetter, Callable[[], bytes]]:
    """``(n, get(indices) -> (x, y), content digest)``; the digest is computed only when asked for."""
    if isinstance(data, ArrayDataset):

        def digest_arrays() -> bytes:
            h = hashlib.blake2b(digest_size=16)
            h.update(repr((data.images.shape, str(data.images.dtype), normalize)).encode())
            h.update(np.ascontiguousarray(data.images).tobytes())
            h.update(data.labels.tobytes())
            return h.digest()

        return len(data), (lambda idx: data.batch(idx, normalize)), digest_arrays
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

    return int(ys.shape[0]), get, digest_tensors


def _fingerprint(cfg: TrainingConfig, data_digest: bytes, model: nn.Module, extra: str) -> str:
    h = hashlib.sha256()
    h.update(cfg.model_dump_json().encode())
    h.update(data_digest)
    h.update(extra.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` (at most ``cfg.max_steps`` steps).

    ``global_tensors`` (the round's global weights by parameter name, as from
    :func:`learning.state.get_tensors`) anchor the FedProx term ``(mu/2)·||w − w_g||²`` when
    ``cfg.prox_mu > 0``. ``normalize`` applies to an :class:`ArrayDataset`; tensors are used as given.
    ``threads`` sets ``torch.set_num_threads`` for the call (process-wide; restored after).
    """
    t0 = time.perf_counter()
    n, get_batch, data_digest = _batch_source(dataset, normalize)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    plan_fn = batch_plan or shuffled_batches
    make_opt = optimizer_factory or sgd_optimizer
    criterion = loss_fn or _loss_from_config(cfg, dataset)
    device = next(model.parameters()).device
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    prox: list[tuple[torch.Tensor, torch.Tensor]] = []
    if cfg.prox_mu > 0:
        if global_tensors is None:
            raise ValueError("cfg.prox_mu > 0 needs global_tensors (the round's global weights)")
        params = dict(model.named_parameters())
        missing = [k for k in params if params[k].requires_grad and k not in global_tensors]
        if missing:
            raise ValueError(f"global_tensors lack parameters {missing[:5]}")
        prox = [(p, torch.as_tensor(np.asarray(global_tensors[k]), dtype=p.dtype, device=device))
                for k, p in params.items() if p.requires_grad]

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
            ck_path = Path(checkpoint_path) if checkpoint_path is not None else None
            fingerprint = ""
            if ck_path is not None:
                extra = f"{getattr(plan_fn, '__qualname__', plan_fn)}|{type(optimizer).__qualname__}|{has_bn}"
                fingerprint = _fingerprint(cfg, data_digest(), model, extra)

            epoch = batch_index = steps = samples = 0
            loss_sum = 0.0
            resumed_from = 0
            ck = TrainingCheckpoint.load(ck_path) if ck_path is not None else None
            if ck is not None and ck.fingerprint != fingerprint:
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
            planned = int(min(max_steps, cfg.local_epochs * math.ceil(n / cfg.batch_size)))
            saved_at = steps if ck is not None else -1  # the file on disk already holds this position

            def save(ep: int, b: int, gen_state: torch.Tensor) -> None:
                nonlocal saved_at
                if ck_path is None or saved_at == steps:
                    return
                saved_at = steps
                TrainingCheckpoint(
                    fingerprint=fingerprint, epoch=ep, batch_index=b, steps=steps, samples_seen=samples,
                    loss_sum=loss_sum, model_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                    optimizer_state=optimizer.state_dict(), generator_state=gen_state,
                    torch_rng_state=torch.get_rng_state(),
                ).save(ck_path)

            model.train()
            while epoch < cfg.local_epochs and steps < max_steps:
                epoch_start_state = gen.get_state()
                batches = plan_fn(n, cfg.batch_size, gen)
                for b in range(batch_index, len(batches)):
                    if steps >= max_steps:
                        break
                    if pause is not None and pause.paused:
                        save(epoch, b, epoch_start_state)
                        pause.wait_if_paused()
                    idx = batches[b]
                    if len(idx) == 0 or (has_bn and len(idx) == 1):
                        continue  # BatchNorm cannot train on one sample
                    x, y = get_batch(idx)
                    x, y = x.to(device), y.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    data_loss = criterion(model(x), y)
                    loss = data_loss
                    if prox:
                        sq = torch.stack([(p - g).pow(2).sum() for p, g in prox]).sum()
                        loss = data_loss + 0.5 * cfg.prox_mu * sq
                    loss.backward()
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
