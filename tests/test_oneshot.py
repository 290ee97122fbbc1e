"""learning/oneshot: the losses, the teacher and its adaptation, synthesis, distillation, the pipeline."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from learning.checkpoint import fingerprint
from learning.datasets import make_synthetic
from learning.models import SmallCNN
from learning.oneshot.distill import DistillConfig, distill_trajectory, make_optimizer, replay
from learning.oneshot.ensemble import BatchNormStatistics, Ensemble, batch_statistics_teacher
from learning.oneshot.fedisca import OneShotConfig, one_shot, step_lr
from learning.oneshot.losses import adaptation_weight, batch_moments, bn_statistics_loss, kd_loss, total_variation
from learning.oneshot.models import OneShotError, bn_classifier, check_site_models, require_batchnorm
from learning.oneshot.synthesis import SynthesisConfig, balanced_targets, synthesize
from learning.recipe import default_training
from learning.state import get_tensors
from learning.trainer import train_local
from protocol.errors import Reason


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _bn_model(seed: int, width: int = 4, channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return bn_classifier("small_cnn", in_channels=channels, num_classes=2, width=width)


def _with_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give the model's BatchNorm layers the running statistics of ``x`` (one pass, momentum 1)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model(x)
    return model.eval()


# ---------------------------------------------------------------------------------------------- losses
def test_batch_moments_and_bn_loss_against_numpy() -> None:
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mean, var = batch_moments(x)
    a = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(mean.numpy(), a.mean(1), atol=1e-6)
    np.testing.assert_allclose(var.numpy(), a.var(1), atol=1e-6)
    assert float(bn_statistics_loss(x, mean, var)) == pytest.approx(0.0, abs=1e-6)
    rm, rv = torch.zeros(3), torch.ones(3)
    want = np.linalg.norm(a.mean(1)) + np.linalg.norm(a.var(1) - 1)
    assert float(bn_statistics_loss(x, rm, rv)) == pytest.approx(want, rel=1e-5)


def test_total_variation() -> None:
    assert float(total_variation(torch.full((2, 1, 5, 5), 3.0))) == 0.0
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    # horizontal: one diff of 1; vertical: one; diagonal (1,0)-(0,1): 0; diagonal (0,0)-(1,1): 1
    assert float(total_variation(x)) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        total_variation(torch.zeros(3, 3))


def test_kd_loss() -> None:
    s = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    assert float(kd_loss(s, s.clone(), 4.0)) == pytest.approx(0.0, abs=1e-6)
    t = torch.tensor([[-1.0, 2.0], [3.0, 0.0]])
    p = torch.softmax(t, 1)
    q = torch.log_softmax(s, 1)
    want = float((p * (p.log() - q)).sum(1).mean())
    assert float(kd_loss(s, t, 1.0)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        kd_loss(s, t, 0.0)
    with pytest.raises(ValueError):
        kd_loss(s, t[:1], 1.0)


def test_adaptation_weight_moves_from_adapted_to_uploaded_teacher() -> None:
    w = [adaptation_weight(i, 5) for i in range(5)]
    assert w[0] == 0.0 and w == sorted(w) and w[-1] == pytest.approx(0.8)
    with pytest.raises(ValueError):
        adaptation_weight(5, 5)


def test_step_lr() -> None:
    assert [step_lr(1.0, e, 8) for e in range(8)] == [1.0] * 4 + [0.1] * 2 + [0.01] * 2
    assert [step_lr(1.0, e, 3) for e in range(3)] == [1.0] * 3  # too few epochs to drop


# ---------------------------------------------------------------------------------------------- models
def test_groupnorm_models_are_refused_with_a_reason() -> None:
    with pytest.raises(OneShotError) as e:
        require_batchnorm(SmallCNN(norm="group"))
    assert e.value.reason is Reason.BATCHNORM_REQUIRED
    with pytest.raises(OneShotError) as e:
        one_shot([SmallCNN(norm="group")], _bn_model(0), (1, 8, 8), OneShotConfig(epochs=1))
    assert e.value.reason is Reason.BATCHNORM_REQUIRED
    with pytest.raises(OneShotError) as e:
        one_shot([_bn_model(0)], SmallCNN(norm="group"), (1, 8, 8), OneShotConfig(epochs=1))
    assert e.value.reason is Reason.BATCHNORM_REQUIRED


def test_site_models_must_exist_and_agree_on_classes() -> None:
    with pytest.raises(OneShotError) as e:
        check_site_models([])
    assert e.value.reason is Reason.TOO_FEW_UPDATES
    three = bn_classifier("small_cnn", in_channels=1, num_classes=3, width=4)
    with pytest.raises(OneShotError) as e:
        check_site_models([_bn_model(0), three])
    assert e.value.reason is Reason.SHAPE_MISMATCH
    assert check_site_models([_bn_model(0), _bn_model(1, width=8)]) == 2  # architectures may differ


def test_bn_classifier_forces_batchnorm() -> None:
    m = bn_classifier("small_cnn", in_channels=1, num_classes=2, width=4, norm="group")
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


# ---------------------------------------------------------------------------------------------- teacher
def test_ensemble_is_the_weighted_mean_of_logits() -> None:
    a, b = _bn_model(0).eval(), _bn_model(1, width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        la, lb = a(x), b(x)
        torch.testing.assert_close(Ensemble([a, b]).eval()(x), (la + lb) / 2)
        torch.testing.assert_close(Ensemble([a, b], [3, 1]).eval()(x), 0.75 * la + 0.25 * lb)
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(OneShotError):
            Ensemble([a, b], bad)


def test_bn_statistics_hooks_vanish_on_the_models_own_statistics() -> None:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _with_stats(_bn_model(0), x)
    with BatchNormStatistics([model]) as stats:
        with torch.no_grad():
            model(x)
        # ~0: the running variance is the unbiased one (n / (n - 1)), the loss compares the biased one
        assert float(stats.pop()) < 0.05
        with torch.no_grad():
            model(x * 3 + 1)
        assert float(stats.pop()) > 1.0
        with pytest.raises(OneShotError):
            stats.pop()  # nothing collected since the last pop
    with torch.no_grad():
        model(x)
    assert stats._terms == []  # hooks removed on exit


def test_batch_statistics_teacher_normalizes_with_each_batch() -> None:
    model = _with_stats(_bn_model(0), torch.randn(16, 1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = batch_statistics_teacher(model)
    x = torch.randn(8, 1, 8, 8) * 5 + 2  # far from the statistics the model holds
    with torch.no_grad():
        out = adapted(x)
        # train-mode BatchNorm normalizes with the batch's own (biased) statistics
        torch.testing.assert_close(out, copy.deepcopy(model).train()(x))
        assert not torch.allclose(out, model(x), atol=1e-3)  # the site's statistics give other outputs
    for k, v in adapted.state_dict().items():  # the copy's running statistics never moved
        if "running" in k:
            torch.testing.assert_close(v, before[k])
    for k, v in model.state_dict().items():  # and the original is untouched
        torch.testing.assert_close(v, before[k])
    assert not any(p.requires_grad for p in adapted.parameters())


# ---------------------------------------------------------------------------------------------- synthesis
def test_balanced_targets() -> None:
    assert balanced_targets(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        balanced_targets(0, 2)


def test_synthesis_lowers_its_loss_keeps_the_teacher_and_is_deterministic() -> None:
    site = [_with_stats(_bn_model(s), torch.rand(32, 1, 8, 8) * 2 - 1) for s in (0, 1)]
    before = [get_tensors(m) for m in site]
    teacher = Ensemble(site)
    cfg = SynthesisConfig(batch_size=8, iterations=30, lr=0.1, keep_every=10, pixel_range=(-1.0, 1.0))
    a = synthesize(teacher, (1, 8, 8), 2, cfg, torch.Generator().manual_seed(3))
    b = synthesize(teacher, (1, 8, 8), 2, cfg, torch.Generator().manual_seed(3))
    assert len(a.snapshots) == 4 and a.targets.tolist() == [0, 1] * 4
    torch.testing.assert_close(a.images, b.images)
    assert float(a.images.min()) >= -1.0 and float(a.images.max()) <= 1.0
    first, last = a.losses[0], a.losses[-1]
    assert last["ce"] + last["bn"] < first["ce"] + first["bn"]
    for m, t in zip(site, before, strict=True):
        for k, v in get_tensors(m).items():
            np.testing.assert_array_equal(v, t[k])
        assert all(p.requires_grad for p in m.parameters())  # flags restored


def test_distillation_without_adaptation_pulls_the_student_to_the_teacher() -> None:
    teacher = Ensemble([_with_stats(_bn_model(0), torch.randn(32, 1, 8, 8))])
    student = _bn_model(5)
    xs = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    cfg = DistillConfig(lr=0.05, temperature=1.0, adapt=False)
    losses = distill_trajectory(student, teacher, None, xs, make_optimizer(student, cfg), cfg)
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_replay_takes_its_steps_on_the_pool() -> None:
    teacher = Ensemble([_with_stats(_bn_model(0), torch.randn(32, 1, 8, 8))])
    student = _bn_model(5)
    pool = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    off = DistillConfig(replay_steps=0)
    assert replay(student, teacher, pool, make_optimizer(student, off), off, 8, torch.Generator()) == []
    cfg = DistillConfig(lr=0.05, temperature=1.0, replay_steps=30)
    losses = replay(student, teacher, pool, make_optimizer(student, cfg), cfg, 8, torch.Generator().manual_seed(1))
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])


# ---------------------------------------------------------------------------------------------- pipeline
def test_one_shot_learns_the_task_from_synthetic_images_only() -> None:
    """Two sites each see half of a learnable set; the distilled model never sees a real image."""
    data = make_synthetic(400, seed=0, size=12)
    x = torch.from_numpy(data.images).float().div(255).sub(0.5).div(0.25).unsqueeze(1)
    y = torch.from_numpy(data.labels)
    held_x = x[300:]
    held_y = y[300:]
    sites = []
    for s, idx in enumerate((np.arange(0, 150), np.arange(150, 300))):
        m = _bn_model(s, width=8)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        m.train()
        g = torch.Generator().manual_seed(s)
        for _ in range(60):
            b = torch.from_numpy(idx)[torch.randint(0, len(idx), (32,), generator=g)]
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[b]), y[b]).backward()
            opt.step()
        sites.append(m.eval())
    with torch.no_grad():
        site_acc = [float((m(held_x).argmax(1) == held_y).float().mean()) for m in sites]
    assert min(site_acc) > 0.8, site_acc  # the teachers know the task
    student = _bn_model(9, width=8)
    cfg = OneShotConfig(epochs=4, synthesis=SynthesisConfig(batch_size=32, iterations=15, lr=0.1, pixel_range=(-2, 2)),
                        distill=DistillConfig(lr=0.05))
    epochs: list[int] = []
    result = one_shot(sites, student, (1, 12, 12), cfg, seed=0, on_epoch=lambda e, m: epochs.append(e))
    assert epochs == [1, 2, 3, 4] and len(result.history) == 4
    assert result.history[-1]["teacher_accuracy_on_synthetic"] >= 0.6
    student.eval()
    with torch.no_grad():
        acc = float((student(held_x).argmax(1) == held_y).float().mean())
    majority = max(float(held_y.float().mean()), 1 - float(held_y.float().mean()))
    assert acc > majority + 0.15, (acc, majority)


def test_an_agent_can_checkpoint_a_batchnorm_model(tmp_path: Path) -> None:
    """The agent's training checkpoint fingerprints every state tensor, BatchNorm's 0-dim counter included."""
    model = _bn_model(0)
    cfg = default_training(1, 2)
    fp = fingerprint(cfg, b"data", model, "")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert fingerprint(cfg, b"data", model, "") != fp
    data = make_synthetic(40, seed=0, size=8)
    result = train_local(model, data, cfg, checkpoint_path=tmp_path / "ck.pt")
    assert result.steps == 2 and (tmp_path / "ck.pt").exists()
