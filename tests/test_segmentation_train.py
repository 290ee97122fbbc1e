"""Segmentation client and server steps: the loss falls, Dice is Dice, FedBN keeps norms at home."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from seg_helpers import TINY, disc_set, disc_site

from coordinator.strategies import build_strategy
from fedscan.segment_arms import coordinator_aggregate
from learning.segmentation.client import SegTrainConfig, SiteState, train_site
from learning.segmentation.errors import SegmentationError
from learning.segmentation.model import build_unet, dice_scores, evaluate_dice, is_norm, one_hot, seg_loss
from learning.segmentation.server import server_step
from learning.segmentation.sharing import ShareRule, get_named, local_names, norm_names, shared_names
from learning.state import travelling_names
from protocol.errors import Reason

torch.set_num_threads(1)
FEDAVG = coordinator_aggregate(build_strategy("fedavg"))


def _loss(model: torch.nn.Module, images: np.ndarray, masks: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float(seg_loss()(model(torch.from_numpy(images)), one_hot(torch.from_numpy(masks))))


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 1e-2), ("sgd", 0.1)])
def test_loss_decreases_and_dice_rises_on_a_tiny_synthetic_set(optimizer: str, lr: float) -> None:
    site = disc_site(n=16)
    model = build_unet(TINY, seed=0)
    before, dice0 = _loss(model, site.train.images, site.train.masks), evaluate_dice(model, site.train)["dice"]
    cfg = SegTrainConfig(steps=40, batch_size=8, lr=lr, share=ShareRule.FEDAVG, optimizer=optimizer)  # type: ignore[arg-type]
    u = train_site(model, site, cfg, global_tensors=get_named(model, shared_names(model, cfg.share)),
                   state=SiteState(), round_id=1)
    after = _loss(model, site.train.images, site.train.masks)
    assert after < 0.7 * before, (before, after)
    assert evaluate_dice(model, site.train)["dice"] > max(0.5, dice0 + 0.2)
    assert u.sample_count == 16 and np.isfinite(u.metrics["train_loss"]) and u.state.rounds == 1


def test_dice_metric_agrees_with_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    pred = (rng.random((5, 12, 12)) < 0.3).astype(np.uint8)
    truth = (rng.random((5, 12, 12)) < 0.3).astype(np.uint8)
    cases = np.asarray(["a", "a", "b", "b", "b"])  # slices of one case are pooled into one volume
    got = dice_scores(pred, truth, cases)
    for case in ("a", "b"):
        p, t = pred[cases == case].astype(bool), truth[cases == case].astype(bool)
        assert got[case] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), rel=1e-6)
    # perfect and disjoint predictions; an empty ground truth has no Dice (left out of means)
    assert dice_scores(truth, truth, cases)["a"] == pytest.approx(1.0)
    assert dice_scores(1 - truth, truth, cases)["b"] == pytest.approx(0.0)
    empty = dice_scores(pred[:1], np.zeros_like(truth[:1]), np.asarray(["z"]))
    assert np.isnan(empty["z"])


def test_fedbn_keeps_norm_tensors_out_of_the_shared_set() -> None:
    model = build_unet(TINY, seed=0)
    norms = norm_names(model)
    assert norms and all(n.rsplit(".", 1)[-1] in ("weight", "bias") for n in norms)
    fedbn_shared, fedbn_local = shared_names(model, ShareRule.FEDBN), local_names(model, ShareRule.FEDBN)
    assert not set(fedbn_shared) & norms and set(fedbn_local) == norms
    assert sorted(fedbn_shared + fedbn_local) == sorted(travelling_names(model))
    assert shared_names(model, ShareRule.FEDAVG) == travelling_names(model)
    head = local_names(model, ShareRule.LOCAL_HEAD)
    assert head and head[-1] == travelling_names(model)[-1] and len(head) < len(fedbn_shared)
    # every norm module's parameters are local: none leak through another name
    for name, mod in model.named_modules():
        if is_norm(mod):
            assert {f"{name}.weight", f"{name}.bias"} <= set(fedbn_local)


def test_fedbn_round_sends_shared_tensors_only_and_keeps_local_ones_on_the_site() -> None:
    sites = [disc_site("a", n=8, seed=1), disc_site("b", n=8, seed=2)]
    cfg = SegTrainConfig(steps=3, batch_size=4, share=ShareRule.FEDBN)
    model = build_unet(TINY, seed=0)
    base = get_named(model, shared_names(model, cfg.share))
    updates = []
    for s in sites:
        u = train_site(build_unet(TINY, seed=0), s, cfg, global_tensors=base, state=SiteState(), round_id=1)
        assert list(u.tensors) == list(base) and set(u.state.local) == norm_names(model)
        updates.append((s.name, u))
    # the two sites' norm parameters differ (each trained on its own data) and never reach the server
    a_local, b_local = updates[0][1].state.local, updates[1][1].state.local
    assert any(not np.allclose(a_local[k], b_local[k]) for k in a_local)
    new, report = server_step(base, updates, round_id=1, aggregate=FEDAVG)
    assert list(new) == list(base) and not set(new) & norm_names(model)
    expected = {k: (updates[0][1].tensors[k] + updates[1][1].tensors[k]) / 2 for k in base}  # equal sample counts
    assert all(np.allclose(new[k], expected[k], atol=1e-6) for k in base)
    assert report["sites"] == ["a", "b"] and "privacy" not in report
    # next round: the site's own local tensors are loaded over the fresh model's
    m2 = build_unet(TINY, seed=0)
    u2 = train_site(m2, sites[0], cfg, global_tensors=new, state=updates[0][1].state, round_id=2)
    assert u2.state.rounds == 2


def test_server_weighting_and_typed_rejections() -> None:
    model = build_unet(TINY, seed=0)
    cfg = SegTrainConfig(steps=1, batch_size=4, share=ShareRule.FEDAVG)
    base = get_named(model, shared_names(model, cfg.share))
    ua = train_site(build_unet(TINY, seed=0), disc_site("a", n=4), cfg, global_tensors=base, state=SiteState(),
                    round_id=1)
    ub = train_site(build_unet(TINY, seed=0), disc_site("b", n=12, seed=3), cfg, global_tensors=base,
                    state=SiteState(), round_id=1)
    k = next(iter(base))
    by_samples, _ = server_step(base, [("a", ua), ("b", ub)], round_id=1, aggregate=FEDAVG)
    equal, rep = server_step(base, [("a", ua), ("b", ub)], round_id=1, weighting="equal", aggregate=FEDAVG)
    assert np.allclose(by_samples[k], 0.25 * ua.tensors[k] + 0.75 * ub.tensors[k], atol=1e-6)
    assert np.allclose(equal[k], 0.5 * ua.tensors[k] + 0.5 * ub.tensors[k], atol=1e-6)
    assert rep["weighting"] == "equal" and rep["sample_counts"] == {"a": 4, "b": 12}
    # a bad update is refused with its reason and the round goes on with the others
    bad = ua.tensors.copy()
    bad[k] = np.full_like(bad[k], np.nan)
    new, rep = server_step(base, [("a", replace(ua, tensors=bad)), ("b", ub)], round_id=2, aggregate=FEDAVG)
    assert rep["sites"] == ["b"] and rep["refused"]["a"]["reason"] == Reason.NON_FINITE
    assert np.allclose(new[k], ub.tensors[k])
    missing = {n: v for n, v in ua.tensors.items() if n != k}
    with pytest.raises(SegmentationError) as err:
        server_step(base, [("a", replace(ua, tensors=missing))], round_id=3, aggregate=FEDAVG)
    assert err.value.reason is Reason.TOO_FEW_UPDATES
    assert err.value.detail["refused"]["a"]["reason"] == Reason.SHAPE_MISMATCH
    with pytest.raises(SegmentationError, match="do not match the shared set") as err2:
        train_site(build_unet(TINY, seed=0), disc_site("a", n=4), cfg, global_tensors=missing, state=SiteState(),
                   round_id=1)
    assert err2.value.reason is Reason.SHAPE_MISMATCH


def test_bad_training_configs_are_refused() -> None:
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": 0.0}, {"optimizer": "rmsprop"}, {"momentum": 1.0}):
        with pytest.raises(SegmentationError, match="training config refused"):
            SegTrainConfig(**bad)  # type: ignore[arg-type]


def test_site_state_round_trips_through_its_dict() -> None:
    s = SiteState({"w": np.ones(2, np.float32)}, 0.5, np.asarray([[1.2, 0.1, 10.0]]), 3)
    back = SiteState.from_dict(s.to_dict(), local=s.local)
    assert back.clip == 0.5 and back.rounds == 3 and np.array_equal(back.privacy_events, s.privacy_events)


def test_training_is_deterministic_for_a_seed() -> None:
    site = disc_site(n=8)
    cfg = SegTrainConfig(steps=3, batch_size=4, share=ShareRule.FEDAVG, seed=5)
    outs = []
    for _ in range(2):
        m = build_unet(TINY, seed=0)
        outs.append(train_site(m, site, cfg, global_tensors=get_named(m, shared_names(m, cfg.share)),
                               state=SiteState(), round_id=1).tensors)
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert disc_set(2).images.shape == (2, 1, 16, 16)
