"""learning.anomaly: the FedDis autoencoder's sharing split, its losses, local training, residual
maps / scores / site thresholds and the metrics — each on small planted inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learning.anomaly.errors import AnomalyError
from learning.anomaly.losses import (
    feddis_loss,
    gamma_shift,
    latent_orthogonality,
    paint_hyperintensities,
    shape_consistency,
)
from learning.anomaly.metrics import best_dice, dice_at, image_auroc, pixel_auprc
from learning.anomaly.model import AEConfig, ShareRule, build_ae, get_named, local_names, set_named, shared_names
from learning.anomaly.scoring import (
    ResidualSign,
    ScoreConfig,
    anomaly_maps,
    calibrate,
    image_scores,
    score_images,
    thresholds_from,
)
from learning.anomaly.train import TrainConfig, make_optimizer, site_round, train_steps
from learning.state import travelling_names
from protocol.errors import Reason

TINY = AEConfig(size=16, shape_widths=(8, 8), app_widths=(4, 4), groups=4)


def _blobs(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth 'normal' images: a bright disc of random radius on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = rng.uniform(size * 0.25, size * 0.4, n)
    d = np.sqrt((yy - size / 2) ** 2 + (xx - size / 2) ** 2)
    return (0.5 * (d[None] < r[:, None, None])).astype(np.float32)


def test_feddis_shares_only_the_shape_branch() -> None:
    m = build_ae(TINY, seed=0)
    shared, local = shared_names(m, ShareRule.FEDDIS), local_names(m, ShareRule.FEDDIS)
    assert shared and local and set(shared).isdisjoint(local)
    assert sorted(shared + local) == sorted(travelling_names(m))
    assert all(n.startswith(("shape_enc.", "shape_dec.")) for n in shared)
    assert any(n.startswith("app_enc.") for n in local) and any(n.startswith("merge.") for n in local)
    assert shared_names(m, ShareRule.ALL) == travelling_names(m) and local_names(m, ShareRule.ALL) == []
    with torch.no_grad():
        out = m(torch.rand(2, 1, 16, 16))
    assert out.recon.shape == (2, 1, 16, 16) and float(out.recon.min()) >= 0 and float(out.recon.max()) <= 1
    assert out.z_shape.shape == (2, 8, 4, 4) and out.z_app.shape == (2, 4, 4, 4)


@pytest.mark.parametrize("cfg", [AEConfig(size=18, shape_widths=(8, 8), app_widths=(4, 4)),
                                 AEConfig(size=16, shape_widths=(8, 8), app_widths=(4,)),
                                 AEConfig(size=16, shape_widths=(6, 8), app_widths=(4, 4))])
def test_bad_architecture_is_refused(cfg: AEConfig) -> None:
    with pytest.raises(AnomalyError) as e:
        build_ae(cfg)
    assert e.value.reason is Reason.BAD_CONFIG


def test_set_named_refuses_unknown_wrong_shape_and_non_finite() -> None:
    m = build_ae(TINY, seed=0)
    name = shared_names(m, ShareRule.FEDDIS)[0]
    good = get_named(m, [name])[name]
    for bad, reason in [({"nope": good}, Reason.SHAPE_MISMATCH), ({name: good[:1]}, Reason.SHAPE_MISMATCH),
                        ({name: np.full_like(good, np.nan)}, Reason.NON_FINITE)]:
        with pytest.raises(AnomalyError) as e:
            set_named(m, bad)
        assert e.value.reason is reason


def test_latent_losses_have_their_fixed_points() -> None:
    z = torch.rand(3, 4, 2, 2) + 0.1
    assert float(shape_consistency(z, z.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(shape_consistency(z, -z)) == pytest.approx(2.0, abs=1e-5)
    # appearance code orthogonal to the projected shape code (channel mean): zero loss
    z_s = torch.zeros(1, 2, 2, 2)
    z_s[0, :, 0, 0] = 1.0
    z_a = torch.zeros(1, 3, 2, 2)
    z_a[0, :, 1, 1] = 1.0
    assert float(latent_orthogonality(z_a, z_s)) == pytest.approx(0.0, abs=1e-6)
    assert float(latent_orthogonality(z_s.mean(1, keepdim=True).expand(-1, 3, -1, -1).clone(), z_s)) == pytest.approx(1.0)
    x = torch.rand(2, 1, 4, 4)
    parts = feddis_loss(x, x * 0.5, z, z, None, lambda_s=0.0, lambda_l=0.0)
    assert float(parts.total) == pytest.approx(float((x * 0.5).sub(x).abs().mean()))


def test_gamma_shift_keeps_range_and_changes_contrast() -> None:
    x = torch.linspace(0, 1, 64).view(4, 1, 4, 4)
    y = gamma_shift(x, torch.Generator().manual_seed(0), low=0.5, high=2.0)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 and not torch.allclose(x, y)


def test_training_on_normal_images_lowers_reconstruction_error() -> None:
    torch.set_num_threads(1)
    m = build_ae(TINY, seed=0)
    cfg = TrainConfig(steps=40, batch_size=16, lr=5e-3)
    opt, gen = make_optimizer(m, cfg), torch.Generator().manual_seed(0)
    images = _blobs(64)
    first = train_steps(m, opt, images, TrainConfig(steps=1, batch_size=16, lr=5e-3), gen)
    later = train_steps(m, opt, images, cfg, gen)
    assert later["recon_l1"] < 0.6 * first["recon_l1"] and later["scl"] >= 0.0 and later["lol"] >= 0.0


def test_bad_images_are_refused_with_a_reason() -> None:
    m = build_ae(TINY, seed=0)
    opt, gen = make_optimizer(m, TrainConfig()), torch.Generator()
    with pytest.raises(AnomalyError) as e:
        train_steps(m, opt, np.zeros((4, 8, 8), np.float32), TrainConfig(steps=1), gen)
    assert e.value.reason is Reason.SHAPE_MISMATCH
    bad = _blobs(4)
    bad[0, 0, 0] = np.inf
    with pytest.raises(AnomalyError) as e:
        train_steps(m, opt, bad, TrainConfig(steps=1), gen)
    assert e.value.reason is Reason.NON_FINITE
    with pytest.raises(AnomalyError):
        train_steps(m, opt, _blobs(4), TrainConfig(steps=0), gen)


def test_site_round_uploads_shared_and_keeps_local() -> None:
    torch.set_num_threads(1)
    site, other = build_ae(TINY, seed=1), build_ae(TINY, seed=2)
    rule = ShareRule.FEDDIS
    glob = get_named(other, shared_names(other, rule))
    local_before = get_named(site, local_names(site, rule))
    cfg = TrainConfig(steps=2, batch_size=8)
    up, metrics = site_round(site, make_optimizer(site, cfg), glob, _blobs(16), cfg, rule, torch.Generator())
    assert list(up) == shared_names(site, rule) and metrics["loss"] > 0
    assert any(not np.allclose(up[n], glob[n]) for n in up)  # trained from the global shape branch
    local_after = get_named(site, local_names(site, rule))
    assert any(not np.allclose(local_after[n], local_before[n]) for n in local_after)  # local branch trained too


def test_maps_scores_and_thresholds_on_a_planted_anomaly() -> None:
    images = np.zeros((4, 8, 8), np.float32)
    recon = np.zeros_like(images)
    images[1, 2:5, 2:5] = 0.9  # bright square the "reconstruction" lacks
    images[2, 2:5, 2:5] = -0.0
    recon[3, 2:5, 2:5] = 0.9  # reconstruction brighter than the image: not an anomaly under `positive`
    pos = ScoreConfig(sign=ResidualSign.POSITIVE, smooth=0)
    maps = anomaly_maps(images, recon, pos)
    assert maps[1].max() == pytest.approx(0.9) and maps[3].max() == 0.0
    absm = anomaly_maps(images, recon, ScoreConfig(sign=ResidualSign.ABS, smooth=0))
    assert absm[3].max() == pytest.approx(0.9)
    top = image_scores(maps, images, ScoreConfig(smooth=0, top_fraction=9 / 64))
    assert top[1] == pytest.approx(0.9) and top[0] == 0.0
    smoothed = anomaly_maps(images, recon, ScoreConfig(sign=ResidualSign.POSITIVE, smooth=3))
    assert smoothed[1, 3, 3] == pytest.approx(0.9) and smoothed[1, 2, 2] == 0.0  # median removes the corner
    thr = thresholds_from(np.arange(101, dtype=float), maps, images, ScoreConfig(percentile=95.0))
    assert thr.image == pytest.approx(95.0) and thr.n_normal == 101
    with pytest.raises(AnomalyError):
        anomaly_maps(images, recon[:2], pos)
    with pytest.raises(AnomalyError):
        ScoreConfig(percentile=0.0).check()


def test_calibrated_threshold_flags_about_the_percentile_of_normals() -> None:
    torch.set_num_threads(1)
    m = build_ae(TINY, seed=0)
    normals = _blobs(200, seed=3)
    cfg = ScoreConfig(percentile=90.0, smooth=0)
    thr = calibrate(m, normals[:100], cfg)
    _, fresh = score_images(m, normals[100:], cfg)
    flagged = float((fresh > thr.image).mean())
    assert thr.n_normal == 100 and 0.0 < flagged < 0.25  # about 10 % of unseen normals, by construction


def test_metrics_on_known_answers() -> None:
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    with pytest.raises(AnomalyError):
        image_auroc(np.array([0, 0]), np.array([0.1, 0.2]))
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, :2, :2] = 1
    perfect = masks.astype(float) * 0.7 + 0.1
    assert pixel_auprc(perfect, masks) == pytest.approx(1.0)
    d, t = best_dice(perfect, masks)
    assert d == pytest.approx(1.0) and t == pytest.approx(0.8)
    assert dice_at(perfect, masks, 0.5) == pytest.approx(1.0)
    assert dice_at(perfect, masks, 0.0) == pytest.approx(2 * 4 / (32 + 4))
    rng = np.random.default_rng(0)
    assert pixel_auprc(rng.random(masks.shape), masks) < 0.6  # 4 of 32 pixels: chance is 0.125
    with pytest.raises(AnomalyError):
        pixel_auprc(perfect, np.zeros_like(masks))


def test_painted_hyperintensities_only_touch_the_foreground() -> None:
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 4:12, 4:12] = 0.3  # foreground square
    y = paint_hyperintensities(x, torch.Generator().manual_seed(0), max_rects=3, width=(2, 6))
    changed = y != x
    assert changed.any() and not changed[x <= 0.05].any()  # background never painted
    assert float(y[changed].min()) >= 0.6 and float(y.max()) <= 1.0
    with pytest.raises(AnomalyError):
        TrainConfig(paint=-1).check()
