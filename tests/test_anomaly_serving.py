"""learning.anomaly.serving: one image → score, the site's verdict, a map at the input's size, PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from learning.anomaly.errors import AnomalyError
from learning.anomaly.model import AEConfig, build_ae
from learning.anomaly.scoring import ResidualSign, ScoreConfig, SiteThresholds
from learning.anomaly.serving import detect, map_png
from protocol.errors import Reason

CFG = AEConfig(size=16, shape_widths=(8, 8), app_widths=(4, 4))
SCORE = ScoreConfig(sign=ResidualSign.POSITIVE, smooth=0, top_fraction=0.05)


def _thr(image: float, pixel: float = 0.2) -> SiteThresholds:
    return SiteThresholds(image=image, pixel=pixel, percentile=95.0, pixel_percentile=99.0, n_normal=10)


def test_detect_returns_score_verdict_and_map_at_input_size() -> None:
    torch.set_num_threads(1)
    model = build_ae(CFG, seed=0)
    dark = np.zeros((40, 30), np.uint8)
    bright = dark.copy()
    bright[10:25, 8:20] = 255
    calm = detect(model, dark, _thr(0.3), SCORE, model_version="v3", note="n")
    hot = detect(model, bright, _thr(0.3), SCORE, model_version="v3", note="n")
    assert calm.anomaly_map.shape == (40, 30) and hot.anomaly_map.shape == (40, 30)
    assert hot.score > calm.score  # a bright block the autoencoder never saw scores higher
    assert hot.anomalous is (hot.score > 0.3) and calm.anomalous is (calm.score > 0.3)
    assert hot.anomaly_map[15, 12] > hot.anomaly_map[2, 2]
    assert hot.model_version == "v3" and set(hot.timings_ms) == {"preprocess_ms", "inference_ms", "postprocess_ms"}
    # same score for the float version of the same pixels
    same = detect(model, bright.astype(np.float32) / 255.0, _thr(0.3), SCORE, model_version="v3", note="n")
    assert same.score == pytest.approx(hot.score, rel=1e-5)


@pytest.mark.parametrize(("image", "reason"), [
    (np.zeros((4, 4, 3), np.uint8), Reason.SHAPE_MISMATCH),
    (np.full((8, 8), np.nan, np.float32), Reason.NON_FINITE),
    (np.full((8, 8), 3.0, np.float32), Reason.BAD_CONFIG),
])
def test_bad_images_are_refused(image: np.ndarray, reason: Reason) -> None:
    with pytest.raises(AnomalyError) as e:
        detect(build_ae(CFG, seed=0), image, _thr(0.1), SCORE, model_version="v1", note="n")
    assert e.value.reason is reason


def test_map_png_scale_puts_the_threshold_at_128() -> None:
    m = np.array([[0.0, 0.1], [0.2, 0.9]])
    png = map_png(m, pixel_threshold=0.1)
    px = np.asarray(Image.open(io.BytesIO(png)))
    assert px.dtype == np.uint8 and px.tolist() == [[0, 128], [255, 255]]
    with pytest.raises(AnomalyError):
        map_png(np.zeros(4), 0.1)
