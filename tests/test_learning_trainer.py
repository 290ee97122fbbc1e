from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from learning.datasets import ArrayDataset, load_medmnist, make_synthetic
from learning.metrics import evaluate
from learning.models import build_model
from learning.state import get_tensors
from learning.trainer import (
    PauseHook,
    TrainingCancelled,
    TrainingCheckpoint,
    TrainResult,
    class_balanced_loss,
    train_local,
)
from protocol.messages import TrainingConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = make_synthetic(256, seed=0)  # 8 batches of 32 per epoch
CFG = TrainingConfig(local_epochs=3, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4, seed=7)


def fresh_model(norm: str = "group") -> nn.Module:
    torch.manual_seed(123)
    return build_model("small_cnn", width=8, norm=norm)


def run(cfg: TrainingConfig = CFG, data: ArrayDataset = DATA, **kw: object) -> tuple[nn.Module, TrainResult]:
    model = fresh_model()
    result = train_local(model, data, cfg, threads=1, **kw)  # type: ignore[arg-type]
    return model, result


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def differs(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, TrainResult]:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    return run()


def test_same_seed_same_bits_other_seed_other_bits(reference: tuple[nn.Module, TrainResult]) -> None:
    ref, res = reference
    assert (res.steps, res.samples_seen, res.epochs) == (24, 3 * 256, 3)
    assert np.isfinite(res.loss) and res.seconds > 0
    again, res2 = run()
    assert_same_weights(ref, again)
    assert res2.loss == res.loss
    other, _ = run(CFG.model_copy(update={"seed": 8}))
    assert differs(ref, other)
    assert differs(ref, fresh_model())  # it trained at all


def test_caller_rng_and_threads_untouched() -> None:
    model = fresh_model()
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads()
    threads = 2 if threads_before == 1 else 1
    seen: list[int] = []
    train_local(model, DATA, CFG.model_copy(update={"max_steps": 2}), threads=threads,
                progress=lambda *_: seen.append(torch.get_num_threads()))
    assert seen == [threads, threads]
    assert torch.equal(rng_before, torch.get_rng_state())  # the loop seeds its own forked RNG
    assert torch.get_num_threads() == threads_before


def test_max_steps_caps_training() -> None:
    _, res = run(CFG.model_copy(update={"max_steps": 5}))
    assert (res.steps, res.samples_seen, res.epochs) == (5, 160, 0)
    _, res = run(CFG.model_copy(update={"max_steps": 8}))
    assert (res.steps, res.epochs) == (8, 1)


def test_fedprox_term_pulls_towards_global() -> None:
    start = get_tensors(fresh_model())

    def dist(m: nn.Module) -> float:
        return float(sum(np.sum((v - start[k]) ** 2) for k, v in get_tensors(m).items()))

    plain, _ = run(CFG, global_tensors=start)  # mu = 0: global tensors are ignored
    ref, _ = run(CFG)
    assert_same_weights(plain, ref)
    prox, _ = run(CFG.model_copy(update={"prox_mu": 1.0}), global_tensors=start)
    assert dist(prox) < 0.7 * dist(plain)
    with pytest.raises(ValueError, match="global_tensors"):
        run(CFG.model_copy(update={"prox_mu": 0.1}))
    with pytest.raises(ValueError, match="lack parameters"):
        run(CFG.model_copy(update={"prox_mu": 0.1}), global_tensors={"classifier.bias": start["classifier.bias"]})


def test_pause_mid_epoch_then_resume_is_bit_identical(
    tmp_path: Path, reference: tuple[nn.Module, TrainResult]
) -> None:
    ref, ref_res = reference
    ck = tmp_path / "train.ckpt"
    hook = PauseHook()

    def progress(step: int, total: int, loss: float) -> None:
        assert total == 24
        if step == 11:  # epoch 1, batch 3 done: pause before batch 4
            hook.pause()

    model = fresh_model()
    out: list[TrainResult] = []
    worker = threading.Thread(
        target=lambda: out.append(
            train_local(model, DATA, CFG, threads=1, pause=hook, checkpoint_path=ck, progress=progress)
        )
    )
    worker.start()
    deadline = time.monotonic() + 20
    saved = None
    while time.monotonic() < deadline:
        saved = TrainingCheckpoint.load(ck)
        if saved is not None and saved.steps == 11:
            break
        time.sleep(0.01)
    assert saved is not None and (saved.epoch, saved.batch_index, saved.steps) == (1, 3, 11)
    time.sleep(0.2)
    assert worker.is_alive() and hook.paused  # blocked at the batch boundary
    assert TrainingCheckpoint.load(ck).steps == 11  # type: ignore[union-attr]  # nothing ran meanwhile
    shutil.copy(ck, tmp_path / "paused.ckpt")
    hook.resume()
    worker.join(20)
    assert not worker.is_alive()
    assert hook.pauses == 1
    assert_same_weights(ref, model)
    assert out[0].steps == 24 and out[0].loss == ref_res.loss

    # the process dies while paused: a new one resumes from the pause checkpoint
    again, res = run(checkpoint_path=tmp_path / "paused.ckpt")
    assert res.resumed_from_step == 11 and res.steps == 24
    assert_same_weights(ref, again)
    assert res.loss == ref_res.loss


def test_cancel_while_paused_then_restart(
    tmp_path: Path, reference: tuple[nn.Module, TrainResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = tmp_path / "c.ckpt"
    hook = PauseHook(should_pause=lambda: True)  # an external gate, e.g. inference queued
    hook.cancel()
    with pytest.raises(TrainingCancelled):
        run(pause=hook, checkpoint_path=ck)
    saved = TrainingCheckpoint.load(ck)
    assert saved is not None and saved.steps == 0

    # restart; the gate is shut once more before the first batch: the checkpoint on disk already
    # holds this position, so only the three end-of-epoch checkpoints get written
    writes: list[int] = []
    real_save = TrainingCheckpoint.save

    def counting_save(self: TrainingCheckpoint, path: str | Path) -> None:
        writes.append(self.steps)
        real_save(self, path)

    monkeypatch.setattr(TrainingCheckpoint, "save", counting_save)
    checks = iter([True])
    gate = PauseHook(should_pause=lambda: next(checks, False), poll_s=0.001)
    model, res = run(checkpoint_path=ck, pause=gate)
    assert writes == [8, 16, 24]
    assert res.resumed_from_step == 0 and res.steps == 24
    assert_same_weights(reference[0], model)


def test_killed_after_epoch_checkpoint_then_restarted(
    tmp_path: Path, reference: tuple[nn.Module, TrainResult]
) -> None:
    """A real SIGKILL mid-epoch 2 (no cleanup runs); the restart resumes at the epoch-1 checkpoint."""
    ck = tmp_path / "k.ckpt"
    init = tmp_path / "init.pt"
    torch.save(fresh_model().state_dict(), init)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from learning.datasets import make_synthetic
        from learning.models import build_model
        from learning.trainer import train_local
        from protocol.messages import TrainingConfig
        m = build_model("small_cnn", width=8)
        m.load_state_dict(torch.load({str(init)!r}))
        cfg = TrainingConfig.model_validate_json({CFG.model_dump_json()!r})
        def progress(step, total, loss):
            if step == 13:
                os.kill(os.getpid(), signal.SIGKILL)
        train_local(m, make_synthetic(256, seed=0), cfg, threads=1, checkpoint_path={str(ck)!r}, progress=progress)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    saved = TrainingCheckpoint.load(ck)
    assert saved is not None and (saved.epoch, saved.batch_index, saved.steps) == (1, 0, 8)
    assert not (tmp_path / "k.ckpt.tmp").exists()
    model, res = run(checkpoint_path=ck)
    assert res.resumed_from_step == 8 and res.steps == 24
    assert_same_weights(reference[0], model)
    assert res.loss == reference[1].loss


def test_in_process_crash_then_restart(tmp_path: Path, reference: tuple[nn.Module, TrainResult]) -> None:
    ck = tmp_path / "x.ckpt"

    def crash(step: int, total: int, loss: float) -> None:
        if step == 20:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        run(checkpoint_path=ck, progress=crash)
    model, res = run(checkpoint_path=ck)
    assert res.resumed_from_step == 16
    assert_same_weights(reference[0], model)


def test_finished_foreign_and_torn_checkpoints(tmp_path: Path, reference: tuple[nn.Module, TrainResult]) -> None:
    ck = tmp_path / "f.ckpt"
    run(checkpoint_path=ck)
    # finished: returns at once with the trained weights
    model, res = run(checkpoint_path=ck)
    assert res.resumed_from_step == 24 and res.steps == 24
    assert_same_weights(reference[0], model)
    # another config (or other start weights / data): ignored, trains from scratch
    other_cfg = CFG.model_copy(update={"lr": 0.01})
    model, res = run(other_cfg, checkpoint_path=ck)
    assert res.resumed_from_step == 0
    clean, _ = run(other_cfg)
    assert_same_weights(clean, model)
    # a torn file: ignored
    ck.write_bytes(ck.read_bytes()[:100])
    model, res = run(checkpoint_path=ck)
    assert res.resumed_from_step == 0
    assert_same_weights(reference[0], model)


def test_pause_hook_predicate_and_timeout() -> None:
    gate = {"busy": True}
    hook = PauseHook(should_pause=lambda: gate["busy"], poll_s=0.01)
    assert hook.paused
    with pytest.raises(TimeoutError):
        hook.wait_if_paused(timeout=0.05)
    threading.Timer(0.1, lambda: gate.update(busy=False)).start()
    waited = hook.wait_if_paused(timeout=5)
    assert 0.05 < waited < 5 and not hook.paused
    assert hook.wait_if_paused() < 0.05  # not paused: returns at once
    manual = PauseHook()
    manual.pause()
    threading.Timer(0.05, manual.resume).start()
    assert manual.wait_if_paused(timeout=5) > 0.02


def test_batchnorm_model_skips_single_sample_tail() -> None:
    data = make_synthetic(33, seed=2)
    torch.manual_seed(0)
    model = build_model("small_cnn", width=8, norm="batch")
    res = train_local(model, data, CFG.model_copy(update={"local_epochs": 2}), threads=1)
    assert (res.steps, res.samples_seen) == (2, 64)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_plug_in_optimizer_batch_plan_and_tensor_input() -> None:
    calls: list[int] = []

    def adam(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
        calls.append(1)
        return torch.optim.Adam(model.parameters(), lr=1e-3)

    def first_half(n: int, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
        perm = torch.randperm(n // 2, generator=gen).numpy()
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]

    cfg = CFG.model_copy(update={"local_epochs": 1})
    m1, res = run(cfg, optimizer_factory=adam, batch_plan=first_half)
    assert calls == [1] and (res.steps, res.samples_seen) == (4, 128)
    x, y = DATA.batch()
    m2, _ = run(cfg, data=(x, y), optimizer_factory=adam, batch_plan=first_half)  # type: ignore[arg-type]
    assert_same_weights(m1, m2)


def test_real_pneumonia_small_cnn_learns(pneumonia_npz: Path) -> None:
    train = load_medmnist(pneumonia_npz, "train")
    val = load_medmnist(pneumonia_npz, "val")
    torch.manual_seed(1)
    model = build_model("small_cnn", width=16)
    cfg = TrainingConfig(batch_size=32, lr=0.01, momentum=0.9, max_steps=120, seed=1)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = class_balanced_loss(train.labels, 2)
    res = train_local(model, train, cfg, threads=1, loss_fn=loss)
    metrics = evaluate(model, val)
    print(f"\nSmallCNN(w16) 120 steps: {1000 * res.seconds / res.steps:.1f} ms/step (1 thread), val {metrics}")
    assert res.steps == 120
    assert metrics["balanced_accuracy"] > 0.7
    assert metrics["auc"] > 0.85


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_sgd_plugs_in_through_the_hooks() -> None:
    """learning.dp (opacus) wraps model + optimizer; the loop runs them with a Poisson batch plan."""
    from torch.utils.data import DataLoader

    from learning.dp import make_private
    from learning.trainer import poisson_batches, sgd_optimizer

    cfg = CFG.model_copy(update={"local_epochs": 1})
    model = fresh_model()
    loader = DataLoader(DATA.to_tensor_dataset(), batch_size=cfg.batch_size)
    pt = make_private(model, sgd_optimizer(model, cfg), loader, noise_multiplier=1.0, max_grad_norm=1.0, seed=5)
    res = train_local(pt.model, DATA, cfg, threads=1, optimizer_factory=lambda m, c: pt.optimizer,
                      batch_plan=poisson_batches(pt.sample_rate))
    assert res.steps == pt.steps == 8  # the accountant saw every step the loop took
    assert 0 < pt.epsilon(1e-5) < float("inf")
    assert differs(pt.unwrap(), fresh_model())
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batches(0.0)
