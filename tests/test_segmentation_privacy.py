"""Per-site DP for segmentation: adaptive clipping, ε from the accountant, a budget that stops training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from seg_helpers import TINY, disc_site

from learning.privacy_accounting import BudgetExhausted, MechanismEvent, RdpAccountant
from learning.segmentation.client import SegTrainConfig, SiteState, train_site
from learning.segmentation.errors import SegmentationError
from learning.segmentation.model import build_unet, one_hot, seg_loss
from learning.segmentation.privacy import SitePrivacy, budget_of, next_clip, plan_privacy
from learning.segmentation.sharing import ShareRule, get_named, shared_names

torch.set_num_threads(1)
CFG = SegTrainConfig(steps=4, batch_size=4, share=ShareRule.FEDBN)


def _round(model: torch.nn.Module, priv: SitePrivacy | None, state: SiteState, round_id: int, n: int = 16,
           cfg: SegTrainConfig = CFG):
    base = get_named(model, shared_names(model, cfg.share))
    return train_site(model, disc_site(n=n), cfg, global_tensors=base, state=state, round_id=round_id,
                      privacy=priv, noise_seed=7)


def test_next_clip_steps_toward_the_target_quantile() -> None:
    kw = {"target_quantile": 0.5, "lr": 0.2, "min_clip": 1e-3, "max_clip": 1e3}
    assert next_clip(1.0, 8.0, 8.0, **kw) == pytest.approx(math.exp(-0.1))  # all unclipped: C too big, shrink
    assert next_clip(1.0, 0.0, 8.0, **kw) == pytest.approx(math.exp(0.1))  # all clipped: C too small, grow
    assert next_clip(1.0, 4.0, 8.0, **kw) == pytest.approx(1.0)  # at the target quantile: stay
    assert next_clip(1e3, 0.0, 8.0, **kw) == 1e3 and next_clip(1e-3, 8.0, 8.0, **kw) == 1e-3  # clamped


def _median_per_sample_norm(model: torch.nn.Module, n: int = 16) -> float:
    site, loss = disc_site(n=n), seg_loss()
    norms = []
    for i in range(n):
        model.zero_grad()
        loss(model(torch.from_numpy(site.train.images[i:i + 1])),
             one_hot(torch.from_numpy(site.train.masks[i:i + 1]))).backward()
        norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))))
    model.zero_grad()
    return float(np.median(norms))


@pytest.mark.parametrize("start", [100.0, 1e-3])
def test_adaptive_clip_bound_moves_toward_the_median_gradient_norm(start: float) -> None:
    median = _median_per_sample_norm(build_unet(TINY, seed=0))
    priv = SitePrivacy(epsilon=50.0, planned_rounds=1, initial_clip=start, min_clip=1e-4, max_clip=1e4, clip_lr=0.2,
                       target_quantile=0.5)
    cfg = SegTrainConfig(steps=24, batch_size=4, share=ShareRule.FEDBN)
    u = _round(build_unet(TINY, seed=0), priv, SiteState(), 1, cfg=cfg)
    after = u.metrics["dp_clip"]
    assert u.metrics["dp_clip_before"] == start and u.state.clip == after
    assert abs(math.log(after / median)) < abs(math.log(start / median)) - 2.0, (start, after, median)
    # fixed clipping never moves and releases no count
    fixed = SitePrivacy(epsilon=50.0, planned_rounds=1, initial_clip=start, clipping="fixed")
    uf = _round(build_unet(TINY, seed=0), fixed, SiteState(), 1, cfg=cfg)
    assert uf.metrics["dp_clip"] == start and uf.metrics["dp_count_stddev"] == 0.0
    assert uf.metrics["dp_update_noise_multiplier"] == uf.metrics["dp_noise_multiplier"]


def test_reported_epsilon_is_the_accountants() -> None:
    priv = SitePrivacy(epsilon=6.0, delta=1e-5, planned_rounds=3)
    plan = plan_privacy(priv, n=16, batch_size=CFG.batch_size, steps_per_round=CFG.steps)
    state = SiteState()
    model = build_unet(TINY, seed=0)
    for r in (1, 2, 3):
        u = _round(model, priv, state, r)
        state = u.state
        independent = RdpAccountant([MechanismEvent(plan.z, plan.sampling_rate, CFG.steps * r)]).epsilon(1e-5)
        assert u.metrics["dp_epsilon"] == pytest.approx(independent, rel=1e-9)
        assert u.metrics["dp_epsilon"] == pytest.approx(budget_of(priv, state.privacy_events).spent, rel=1e-12)
        assert u.metrics["dp_noise_multiplier"] == plan.z and u.metrics["dp_sampling_rate"] == 0.25
    # the noise was calibrated so the planned rounds spend (almost exactly) the site's budget
    assert 0.97 * 6.0 <= u.metrics["dp_epsilon"] <= 6.0
    assert u.metrics["dp_epsilon_round"] > 0


def test_budget_exhaustion_stops_training_with_a_typed_error() -> None:
    priv = SitePrivacy(epsilon=4.0, planned_rounds=2)
    model = build_unet(TINY, seed=0)
    state = SiteState()
    for r in (1, 2):
        state = _round(model, priv, state, r).state
    before = {k: v.copy() for k, v in get_named(model, list(model.state_dict())).items()}
    with pytest.raises(BudgetExhausted) as err:
        _round(model, priv, state, 3)
    assert err.value.budget == 4.0 and err.value.would_be > 4.0 >= err.value.spent
    after = get_named(model, list(model.state_dict()))
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing trained, nothing to release


def test_each_site_calibrates_noise_to_its_own_budget() -> None:
    z = {eps: plan_privacy(SitePrivacy(epsilon=eps, planned_rounds=10), n=65, batch_size=8, steps_per_round=10).z
         for eps in (4.0, 8.0)}
    assert z[4.0] > z[8.0] > 0
    # a larger site samples a smaller fraction, so it needs less noise for the same ε
    big = plan_privacy(SitePrivacy(epsilon=4.0, planned_rounds=10), n=500, batch_size=8, steps_per_round=10)
    assert big.z < z[4.0] and big.sampling_rate == pytest.approx(8 / 500)
    # adaptive clipping: gradient noise and count noise together cost exactly z (Andrew et al., Thm 1)
    p = plan_privacy(SitePrivacy(epsilon=4.0, planned_rounds=10), n=65, batch_size=8, steps_per_round=10)
    assert (p.sigma_update ** -2 + (2 * p.count_stddev) ** -2) ** -0.5 == pytest.approx(p.z)
    assert p.z < p.sigma_update <= 1.16 * p.z
    with pytest.raises(SegmentationError, match="cannot be reached"):
        plan_privacy(SitePrivacy(epsilon=4.0, planned_rounds=10, count_stddev=0.5), n=65, batch_size=8,
                     steps_per_round=10)


def test_bad_privacy_settings_are_refused() -> None:
    for bad in ({"epsilon": math.inf}, {"epsilon": 0.0}, {"epsilon": 4.0, "delta": 1.0},
                {"epsilon": 4.0, "planned_rounds": 0}, {"epsilon": 4.0, "initial_clip": 0.0},
                {"epsilon": 4.0, "clipping": "median"}, {"epsilon": 4.0, "count_stddev": 0.0}):
        with pytest.raises(SegmentationError, match="privacy settings refused"):
            SitePrivacy(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("clipping", ["adaptive", "fixed"])
def test_an_empty_poisson_sample_still_takes_its_noisy_step(clipping: str) -> None:
    """Expected batch 1 of 16 images: some of the 12 steps sample nothing (P ≈ 0.36 each; seeded).

    opacus' adaptive-clipping optimizer failed on them ("cannot reshape tensor of 0 elements"): a
    centralized DP run of the segmentation bench crashed after ~60 s, and a box could too.
    """
    cfg = SegTrainConfig(steps=12, batch_size=1, share=ShareRule.FEDBN)
    priv = SitePrivacy(epsilon=8.0, planned_rounds=1, clipping=clipping)  # type: ignore[arg-type]
    model = build_unet(TINY, seed=0)
    u = _round(model, priv, SiteState(), 1, cfg=cfg)
    assert u.metrics["dp_epsilon"] > 0 and np.isfinite(u.metrics["dp_clip"])
    assert all(np.isfinite(v).all() for v in u.tensors.values())
    if clipping == "adaptive":  # every step released its noised count, the empty ones too
        assert np.isfinite(u.metrics["dp_noised_unclipped_fraction"])


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))


def test_lr_per_clip_keeps_the_step_size_of_the_initial_bound() -> None:
    """With ``lr_per_clip`` the learning rate follows ``initial_clip / C``: no effect on fixed clipping
    (bitwise), and a bound that shrinks from 100 toward the gradient norms (~1) keeps moving the model
    with the initial step size, where the plain rule's steps shrink with the bound."""
    cfg = SegTrainConfig(steps=12, batch_size=4, share=ShareRule.FEDBN)
    base = get_named(build_unet(TINY, seed=0), shared_names(build_unet(TINY, seed=0), cfg.share))
    fixed = [_round(build_unet(TINY, seed=0), SitePrivacy(epsilon=50.0, planned_rounds=1, clipping="fixed",
                                                          lr_per_clip=flag), SiteState(), 1, cfg=cfg)
             for flag in (False, True)]
    assert _distance(fixed[0].tensors, fixed[1].tensors) == 0.0
    kw = {"epsilon": 50.0, "planned_rounds": 1, "initial_clip": 100.0, "min_clip": 1e-4, "max_clip": 1e4,
          "clip_lr": 0.5, "target_quantile": 0.5}
    plain, scaled = (_round(build_unet(TINY, seed=0), SitePrivacy(**kw, lr_per_clip=flag), SiteState(), 1, cfg=cfg)
                     for flag in (False, True))
    assert plain.metrics["dp_clip"] < 50 and scaled.metrics["dp_clip"] < 50  # the bound came down
    assert _distance(scaled.tensors, base) > 1.5 * _distance(plain.tensors, base)
