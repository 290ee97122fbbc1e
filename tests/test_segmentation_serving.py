"""Segmentation serving: one image → mask at the input's size, lesion area in px and mm², same pixels as training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from seg_helpers import TINY

from learning.brain_mri import normalise_volume
from learning.data_path import data_dir
from learning.datasets import DatasetError
from learning.segmentation.data import MRI, PH2, load_ph2, load_ph2_pair, ph2_ids
from learning.segmentation.errors import SegmentationError
from learning.segmentation.model import build_unet
from learning.segmentation.serving import mask_png, preprocess_flair, segment_image

PH2_ROOT = data_dir() / "ph2"
torch.set_num_threads(1)


class _Recorder(torch.nn.Module):
    """A model that records its input and predicts 'lesion' where the input is darker than its mean."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        lesion = (x.mean(dim=1, keepdim=True) < x.mean()).float() * 8 - 4
        return torch.cat([-lesion, lesion], dim=1)


@pytest.mark.skipif(not PH2_ROOT.is_dir(), reason=f"{PH2_ROOT} not present (shared data)")
def test_ph2_image_is_served_with_the_training_pixels_and_a_full_size_mask() -> None:
    image_id = ph2_ids(PH2_ROOT)[0]
    rgb, truth = load_ph2_pair(PH2_ROOT, image_id)
    model = _Recorder()
    out = segment_image(model, rgb, modality=PH2, size=32, channels=1, spacing_mm=(0.05, 0.04), model_version="v7")
    # the model saw exactly the pixels training sees for this image
    trained_on = load_ph2(PH2_ROOT, [image_id], size=32, channels=1).images
    assert torch.equal(model.seen[0], torch.from_numpy(trained_on))
    assert out.mask.shape == rgb.shape[:2] and set(np.unique(out.mask)) <= {0, 1}
    assert out.area_px == int(out.mask.sum()) > 0
    assert out.area_mm2 == pytest.approx(out.area_px * 0.05 * 0.04)
    # the dark-lesion rule finds most of the clinicians' lesion (the mask is in the input's own pixels)
    overlap = (out.mask & truth).sum() / truth.sum()
    assert overlap > 0.7
    assert out.model_version == "v7" and "clinicians" in out.note
    assert set(out.timings_ms) == {"preprocess_ms", "inference_ms", "postprocess_ms"}
    png = Image.open(io.BytesIO(mask_png(out.mask)))
    assert png.mode == "L" and np.array_equal(np.asarray(png), out.mask * 255)


def test_unet_serves_any_input_size_and_refuses_bad_input() -> None:
    model = build_unet(TINY, seed=0)
    rgb = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    out = segment_image(model, rgb, modality=PH2, size=16, channels=1)
    assert out.mask.shape == (37, 53) and out.area_mm2 is None and out.spacing_mm is None
    flair = np.random.default_rng(1).random((40, 44)).astype(np.float32) * 300
    f = segment_image(model, flair, modality=MRI, size=16, channels=1, spacing_mm=(2.0, 2.0))
    assert f.mask.shape == (40, 44) and f.area_mm2 == pytest.approx(4.0 * f.area_px) and "DLWMLS" in f.note
    with pytest.raises(DatasetError, match="unknown modality"):
        segment_image(model, rgb, modality="ct", size=16, channels=1)
    with pytest.raises(DatasetError, match="spacing"):
        segment_image(model, rgb, modality=PH2, size=16, channels=1, spacing_mm=(0.0, 1.0))
    with pytest.raises(DatasetError):
        segment_image(model, np.zeros((5,), np.uint8), modality=PH2, size=16, channels=1)
    with pytest.raises(DatasetError, match="finite"):
        segment_image(model, np.full((8, 8), np.nan, np.float32), modality=MRI, size=16, channels=1)
    with pytest.raises(SegmentationError, match="2D"):
        mask_png(np.zeros((2, 2, 2), np.uint8))


def test_flair_slice_with_the_volume_scale_matches_training_preprocessing() -> None:
    vol = np.random.default_rng(2).random((20, 20, 5)).astype(np.float32) * 200
    vol[:3] = 0
    hi = float(np.percentile(vol[vol > 0], 99.5))
    trained = normalise_volume(vol)[..., 2]
    served = preprocess_flair(vol[..., 2], size=20, channels=3, scale=hi)
    assert served.shape == (3, 20, 20) and np.allclose(served[0], trained, atol=1e-6)
