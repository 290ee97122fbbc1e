"""Client-side DP-SGD (learning.dp) on GroupNorm models: trains, clips, adds noise, reports ε."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant as OpacusRDP
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from learning.dp import DPIncompatibleModel, PrivateTraining, make_private
from learning.models import build_model
from learning.privacy_accounting import BudgetExhausted, PrivacyBudget, RdpAccountant, noise_multiplier_for_epsilon

DELTA = 1e-5
# opacus' hooks on the first layer fire for an input without grad; harmless
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.5
    x[:, :, 8:20, 8:20] += (y.float() * 2 - 1).view(-1, 1, 1, 1)  # a bright/dark square per class
    return TensorDataset(x, y)


def _model(seed: int = 0, norm: str = "group") -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", in_channels=1, num_classes=2, width=8, norm=norm)


def _train(pt: PrivateTraining, epochs: int) -> list[float]:
    losses = []
    pt.model.train()
    for _ in range(epochs):
        for x, y in pt.data_loader:
            if len(y) == 0:
                continue
            pt.optimizer.zero_grad()
            loss = F.cross_entropy(pt.model(x), y)
            loss.backward()
            pt.optimizer.step()
            losses.append(loss.item())
    return losses


def test_dp_sgd_trains_a_groupnorm_model_and_reports_epsilon() -> None:
    t0 = time.perf_counter()
    model = _model()
    data = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pt = make_private(model, opt, DataLoader(data, batch_size=32, shuffle=True), noise_multiplier=1.0,
                      max_grad_norm=1.0, seed=0)
    assert pt.epsilon(DELTA) == 0.0
    losses = _train(pt, epochs=4)
    eps = pt.epsilon(DELTA)
    ref = RdpAccountant()
    ref.compose(1.0, 32 / 256, pt.steps)
    print(f"DP-SGD: {pt.steps} steps, q={pt.sample_rate}, z=1.0, C=1.0 -> eps={eps:.3f} at delta={DELTA}; "
          f"loss {np.mean(losses[:4]):.3f} -> {np.mean(losses[-4:]):.3f}; {time.perf_counter() - t0:.1f}s")
    assert pt.steps == 32 and pt.sample_rate == pytest.approx(1 / 8)
    assert 0 < eps < 10 and eps == pytest.approx(ref.epsilon(DELTA), rel=0.02)  # opacus and dp-accounting agree
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns despite clipping and noise
    x, y = data.tensors
    acc = (pt.unwrap()(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8, acc


def test_batchnorm_is_refused_with_a_clear_message() -> None:
    model = _model(norm="batch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DPIncompatibleModel, match=r"BatchNorm.*features\.1.*norm='group'"):
        make_private(model, opt, DataLoader(_data(64), batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)


def test_per_sample_clipping_bounds_each_step() -> None:
    """Without noise and with C tiny, one step moves the weights by at most lr*C (mean of clipped
    per-sample gradients); plain SGD on the same batch moves them far more."""
    data = _data(64)
    lr, clip = 1.0, 1e-3

    def step(private: bool) -> float:
        model = _model(1)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        loader = DataLoader(data, batch_size=64)
        if private:
            pt = make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)
            m, o, loader = pt.model, pt.optimizer, pt.data_loader
        else:
            m, o = model, opt
        x, y = next(iter(loader))
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float(torch.linalg.vector_norm(after - before))

    moved = step(private=True)
    assert 0 < moved <= lr * clip * (1 + 1e-4)
    assert step(private=False) > 100 * lr * clip


def test_noise_is_seeded_and_real() -> None:
    def run(seed: int) -> torch.Tensor:
        model = _model(2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pt = make_private(model, opt, DataLoader(_data(64), batch_size=16, shuffle=True), noise_multiplier=1.0,
                          max_grad_norm=1.0, seed=seed)
        _train(pt, 1)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_spent_budget_refuses_to_start_training() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(64), batch_size=16)
    budget = PrivacyBudget(epsilon=10.0, delta=DELTA)
    budget.spend(noise_multiplier=1.0, sampling_rate=0.25, steps=20)  # earlier rounds
    with pytest.raises(BudgetExhausted, match="DP-SGD training refused"):
        make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, budget=budget, planned_steps=8)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # nothing was wrapped
    # a fresh, sufficient budget lets it start
    fresh = _model()
    pt = make_private(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), loader, noise_multiplier=1.0,
                      max_grad_norm=1.0, budget=PrivacyBudget(epsilon=50.0, delta=DELTA), planned_steps=8)
    assert pt.steps == 0


def test_the_one_solver_agrees_with_opacus_accounting() -> None:
    """DP-SGD takes its noise multiplier from ``noise_multiplier_for_epsilon`` (our accountant);
    opacus' own RDP accountant, which reports ε during training, must see about the same ε."""
    z = noise_multiplier_for_epsilon(4.0, DELTA, 0.1, 100)
    ours = RdpAccountant()
    ours.compose(z, 0.1, 100)
    theirs = OpacusRDP()
    theirs.history = [(z, 0.1, 100)]
    assert ours.epsilon(DELTA) <= 4.0
    assert theirs.get_epsilon(DELTA) == pytest.approx(4.0, rel=0.05)
    assert noise_multiplier_for_epsilon(2.0, DELTA, 0.1, 100) > z


def test_public_class_weights_reach_opacus_per_sample_gradients() -> None:
    """``weighted_cross_entropy`` under DP-SGD: sample i's per-sample gradient is exactly
    ``w[y_i]`` times its unweighted one (nothing depends on the other records of the batch), and
    the step (no noise, no clipping) is their batch mean. ``F.cross_entropy(weight=)`` — the
    demo's class-balanced loss — fails this: it rescales every record by ``B / Σ_j w[y_j]``."""
    from learning.trainer import weighted_cross_entropy

    data = _data(32, seed=3)
    x, y = data.tensors
    assert 0 < int(y.sum()) < len(y)  # both classes in the batch
    w = torch.tensor([3.0, 0.5])

    def per_sample(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model = _model(4)
        pt = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(data, batch_size=32),
                          noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False)
        pt.optimizer.zero_grad()
        loss_fn(pt.model(x), y).backward()
        params = [p for p in pt.model.parameters() if p.requires_grad]
        gs = torch.cat([p.grad_sample.reshape(len(y), -1) for p in params], dim=1)  # type: ignore[attr-defined]
        pt.optimizer.step()
        step = torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
        return gs, step

    plain, _ = per_sample(F.cross_entropy)
    weighted, step = per_sample(weighted_cross_entropy(w.numpy()))
    expected = w[y].unsqueeze(1) * plain
    assert torch.allclose(weighted, expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(step, expected.mean(0), rtol=1e-4, atol=1e-7)
    coupled, _ = per_sample(lambda out, t: F.cross_entropy(out, t, weight=w))
    scale = len(y) / float(w[y].sum())
    assert abs(scale - 1) > 0.1
    assert torch.allclose(coupled, scale * expected, rtol=1e-4, atol=1e-7)  # every record rescaled by the batch


def test_weighted_cross_entropy_refuses_bad_weights() -> None:
    from learning.trainer import weighted_cross_entropy

    for bad in ([1.0, 0.0], [1.0, float("nan")], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="class weights"):
            weighted_cross_entropy(np.asarray(bad))


@pytest.mark.parametrize("clip", [1e-2, 1e6])
def test_class_weighted_clipping_weights_after_clipping(clip: float) -> None:
    """``class_weighted_clipping``: the step is ``mean_i v[y_i]·clip_C(g_i)`` with ``v = w / max w``,
    so each record still moves the sum by at most C and the weights act even when every per-sample
    gradient is clipped (where a weighted loss would give every record exactly C)."""
    from learning.dp import class_weighted_clipping

    data = _data(32, seed=3)
    x, y = data.tensors
    w = np.array([3.0, 1.5])
    v = torch.tensor(w / w.max(), dtype=torch.float32)

    def run(weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = _model(4)
        pt = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(data, batch_size=32),
                          noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)
        loss_fn = class_weighted_clipping(pt, w) if weighted else F.cross_entropy
        params = [p for p in pt.model.parameters() if p.requires_grad]
        pt.optimizer.zero_grad()
        loss_fn(pt.model(x), y).backward()
        gs = torch.cat([p.grad_sample.reshape(len(y), -1) for p in params], dim=1)  # type: ignore[attr-defined]
        pt.optimizer.step()
        return gs, torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]

    raw, _ = run(weighted=False)
    _, step = run(weighted=True)
    norms = raw.norm(dim=1, keepdim=True)
    expected = (v[y].unsqueeze(1) * raw * (clip / (norms + 1e-6)).clamp(max=1.0)).mean(0)
    assert torch.allclose(step, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    if clip < 1:  # all clipped: the minority class (weight 1) pulls twice as hard as the other (0.5)
        assert bool((norms > clip).all())
    with pytest.raises(ValueError, match="class weights"):
        model = _model(4)
        class_weighted_clipping(make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                             DataLoader(data, batch_size=32), noise_multiplier=0.0,
                                             max_grad_norm=1.0), [1.0, -1.0])
