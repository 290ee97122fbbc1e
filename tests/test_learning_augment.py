"""Training augmentation (MONAI): label-preserving symmetries, colour gains, crops; seeded and bounded."""

from __future__ import annotations

import pytest
import torch
from monai.data import get_track_meta
from pydantic import ValidationError

from learning.augment import DERMOSCOPY, AugmentSpec, BatchAugment, build_augment


def batch(n: int = 6, c: int = 3, size: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, size, size, generator=g) * 0.8 + 0.1


def symmetries(img: torch.Tensor) -> list[torch.Tensor]:
    rots = [torch.rot90(img, k, dims=(1, 2)) for k in range(4)]
    return rots + [torch.flip(r, dims=(2,)) for r in rots]


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    aug = BatchAugment(DERMOSCOPY)
    x = batch()
    a, b, c = aug(x, 7), aug(x, 7), aug(x, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert get_track_meta()  # MONAI's global metadata switch is restored


def test_flips_and_rotations_only_permute_pixels() -> None:
    aug = BatchAugment(AugmentSpec(flip=True, rotate90=True))
    x = batch(n=32)
    out = aug(x, 3)
    seen = set()
    for img, got in zip(x, out, strict=True):
        matches = [i for i, s in enumerate(symmetries(img)) if torch.equal(s, got)]
        assert matches, "an output is not a flip/rotation of its input"
        seen.add(matches[0])
    assert len(seen) >= 4  # the batch shows several different orientations


def test_colour_gain_is_per_channel_and_bounded() -> None:
    aug = BatchAugment(AugmentSpec(colour=0.1, prob=1.0))
    x = batch(size=8) * 0.5 + 0.2  # stays inside (0, 1) after a gain of at most 1.1
    out = aug(x, 11)
    ratio = out / x
    per_channel = ratio.flatten(2)
    assert torch.allclose(per_channel.max(dim=2).values, per_channel.min(dim=2).values, atol=1e-5)
    assert float(ratio.min()) >= 0.9 - 1e-5 and float(ratio.max()) <= 1.1 + 1e-5
    assert float((per_channel[:, 0, 0] - per_channel[:, 1, 0]).abs().max()) > 1e-3  # channels differ


def test_crop_resizes_back_and_changes_pixels() -> None:
    aug = BatchAugment(AugmentSpec(crop=0.5))
    x = batch(size=16)
    out = aug(x, 5)
    assert out.shape == x.shape
    assert not torch.equal(out, x)


def test_inactive_spec_is_identity_and_bad_specs_refused() -> None:
    assert build_augment(None) is None and build_augment(AugmentSpec()) is None
    x = batch()
    assert BatchAugment(AugmentSpec())(x, 1) is x
    with pytest.raises(ValidationError):
        AugmentSpec(colour=2.0)
    with pytest.raises(ValidationError):
        AugmentSpec(hue=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        BatchAugment(DERMOSCOPY)(x[0], 1)
