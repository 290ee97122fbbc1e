"""fedscan.anomaly_arms on tiny synthetic sites: every arm scores each site it serves with the site's
own threshold; the intensity baseline finds planted bright lesions. (Which tensors travel is tested in
test_anomaly_learning.)"""

from __future__ import annotations

import numpy as np
import torch

from fedscan.anomaly_arms import evaluate_site, run_centralized, run_federated, run_intensity, run_single, zero_recon
from learning.anomaly.data import AnomalySplits, EvalSet, Site, apply_appearance
from learning.anomaly.model import AEConfig, ShareRule
from learning.anomaly.scoring import ResidualSign, ScoreConfig
from learning.anomaly.train import TrainConfig

AE = AEConfig(size=16, shape_widths=(8, 8), app_widths=(4, 4))
SCORE = ScoreConfig(sign=ResidualSign.POSITIVE, smooth=0, foreground=0.05, top_fraction=0.05)


def _splits() -> AnomalySplits:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]

    def normals(n: int) -> np.ndarray:
        r = rng.uniform(4, 6, n)
        return (0.4 * (np.hypot(yy - 8, xx - 8)[None] < r[:, None, None])).astype(np.float32)

    test = normals(40)
    masks = np.zeros(test.shape, np.uint8)
    labels = np.zeros(40, np.int64)
    for i in range(0, 40, 2):  # every other test image gets a bright 3×3 "lesion" inside the disc
        test[i, 7:10, 7:10] = 0.95
        masks[i, 7:10, 7:10] = 1
        labels[i] = 1
    sites = [Site(f"site{i}", apply_appearance(normals(24), g), apply_appearance(normals(8), g), g)
             for i, g in enumerate((1.0, 0.6, 1.7))]
    return AnomalySplits("synthetic", sites, EvalSet(test, labels, masks), EvalSet(test, labels, masks), "planted")


def test_every_arm_scores_every_site_it_serves() -> None:
    torch.set_num_threads(1)
    sp = _splits()
    cfg = TrainConfig(steps=2, batch_size=8, paint=1, paint_width=(2, 4))
    fed = run_federated(sp, AE, cfg, SCORE, rule=ShareRule.FEDDIS, rounds=2, seed=0)
    plain = run_federated(sp, AE, cfg, SCORE, rule=ShareRule.ALL, rounds=2, seed=0)
    assert fed.name == "federated-feddis" and plain.name == "federated-fedavg-ae"
    for res in (fed, plain):
        assert set(res.sites) == {"site0", "site1", "site2"}
        for m in res.sites.values():
            assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["pixel_auprc"] <= 1.0
            assert 0.0 <= m["specificity_at_site_threshold"] <= 1.0
        assert set(res.mean()) >= {"image_auroc", "pixel_auprc", "best_dice", "dice_at_site_threshold"}
    single = run_single(sp, "site1", AE, cfg, SCORE, rounds=2, seed=0)
    central = run_centralized(sp, AE, cfg, SCORE, rounds=1, seed=0)
    assert list(single.sites) == ["site1"] and set(central.sites) == {"site0", "site1", "site2"}


def test_intensity_baseline_finds_planted_bright_lesions() -> None:
    sp = _splits()
    res = run_intensity(sp, SCORE)
    for m in res.sites.values():  # the lesion is the brightest thing in the image, at every gamma
        assert m["image_auroc"] == 1.0 and m["pixel_auprc"] > 0.9 and m["best_dice"] > 0.9
    # a site threshold from normals: every normal test image is below it, every lesion above
    m = evaluate_site(zero_recon, sp.sites[0], sp.test, SCORE)
    assert m["sensitivity_at_site_threshold"] == 1.0 and m["specificity_at_site_threshold"] >= 0.9
