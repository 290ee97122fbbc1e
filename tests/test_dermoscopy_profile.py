"""The dermoscope profile (issue 16 item 2): RGB, colour normalization, MONAI augmentation in the
profile, and the same pixels in training and serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedscan.compose import model_spec_for, spec_normalize
from firmware.profile import ProfileError, find_profile, parse_profile
from learning import data_source
from learning.augment import DERMOSCOPY, build_augment
from learning.data_source import DataSource
from learning.datasets import DEFAULT_NORMALIZE
from learning.dicom import decode
from learning.image_files import content_type
from learning.transforms import build_pipeline
from tests.test_learning_folders import FIELD, isic_like

PROFILE = find_profile("dermoscope-melanoma")


def test_profile_is_rgb_with_augmentation_and_normalization() -> None:
    assert PROFILE.input.channels == 3 and PROFILE.model.classes == ["benign", "malignant"]
    assert PROFILE.augmentation == DERMOSCOPY  # the benches and the boxes augment alike
    assert PROFILE.normalization() == ([0.5] * 3, [0.25] * 3)
    assert spec_normalize(model_spec_for(PROFILE)) == PROFILE.normalization()
    assert spec_normalize(model_spec_for(find_profile("xray-cxr-28"))) == ([0.5], [0.25])
    assert find_profile("xray-cxr-28").augmentation is None  # a chest X-ray is never flipped
    assert DEFAULT_NORMALIZE == (0.5, 0.25)


def test_augmentation_is_seeded_label_preserving_geometry_and_bounded() -> None:
    aug = build_augment(PROFILE.augmentation)
    assert aug is not None
    x = torch.rand(4, 3, PROFILE.input.height, PROFILE.input.width)
    a, b, c = aug(x, 7), aug(x, 7), aug(x, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_bad_augmentation_section_names_line_and_field() -> None:
    text = Path("firmware_configs/dermoscope-melanoma.yaml").read_text().replace("  crop: 0.8", "  crop: 0.1")
    with pytest.raises(ProfileError, match=r"dermo\.yaml:\d+: augmentation\.crop"):
        parse_profile(text, "dermo.yaml")
    with pytest.raises(ProfileError, match=r"augmentation\.shear"):
        parse_profile(text.replace("  crop: 0.1", "  shear: 0.2"), "dermo.yaml")


def test_training_and_serving_see_the_same_pixels(tmp_path: Path) -> None:
    """An image loaded for training (folder loader, profile steps, uint8, then the profile's normalize)
    equals what the inference service feeds the model (decode + the manifest's preprocessing)."""
    isic_like(tmp_path, ["benign", "malignant"], size=90)
    ds = data_source.load(DataSource(tmp_path, label_field=FIELD), PROFILE)
    x_train, _ = ds.batch([1], PROFILE.normalization())
    path = tmp_path / "ISIC_0000001.jpg"
    data = path.read_bytes()
    served = build_pipeline(list(model_spec_for(PROFILE).preprocessing))(decode(data, content_type(path, data),
                                                                             PROFILE.input))
    assert served.shape == tuple(x_train.shape[1:]) == (3, 32, 32)
    # training stores [0, 1] as uint8: at most 1/510 off before normalization (std 0.25: x4 after)
    np.testing.assert_allclose(x_train[0].numpy(), served, atol=4 / 510 + 1e-6)
