"""coordinator/strategies/oneshot.py: the one-shot aggregation step over real site updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.strategies.base import ClientResult
from coordinator.strategies.oneshot import OneShotDistillation
from learning.models import build_model
from learning.oneshot.distill import DistillConfig
from learning.oneshot.fedisca import OneShotConfig
from learning.oneshot.models import OneShotError
from learning.oneshot.synthesis import SynthesisConfig
from learning.state import get_tensors
from protocol.errors import Reason

KW = {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "batch"}
TINY = OneShotConfig(epochs=1, synthesis=SynthesisConfig(batch_size=8, iterations=4), distill=DistillConfig())


def _site(seed: int) -> ClientResult:
    torch.manual_seed(seed)
    m = build_model("small_cnn", **KW).train()
    with torch.no_grad():
        m(torch.randn(16, 1, 8, 8) * (1 + seed))  # give each site its own BatchNorm statistics
    return ClientResult(f"site-{seed}", get_tensors(m), 10 * (seed + 1))


def test_aggregate_returns_the_distilled_model_in_the_global_shapes() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = get_tensors(build_model("small_cnn", **KW))
    strat = OneShotDistillation("small_cnn", KW, (1, 8, 8), TINY, seed=0)
    out, report = strat.aggregate(1, base, [_site(1), _site(2)])
    assert list(out) == list(base) and all(out[k].shape == base[k].shape for k in base)
    assert all(np.isfinite(v).all() for v in out.values())
    assert any(not np.allclose(out[k], base[k]) for k in base)  # it trained
    assert report.details["clients"] == ["site-1", "site-2"] and len(report.details["history"]) == 1
    again, _ = OneShotDistillation("small_cnn", KW, (1, 8, 8), TINY, seed=0).aggregate(1, base, [_site(1), _site(2)])
    for k in out:  # reproducible for a seed
        np.testing.assert_array_equal(out[k], again[k])


def test_refusals_carry_reasons() -> None:
    with pytest.raises(OneShotError) as e:
        OneShotDistillation("small_cnn", {**KW, "norm": "group"}, (1, 8, 8), TINY)
    assert e.value.reason is Reason.BATCHNORM_REQUIRED
    strat = OneShotDistillation("small_cnn", KW, (1, 8, 8), TINY)
    base = _site(0).tensors
    with pytest.raises(OneShotError) as e:
        strat.aggregate(1, base, [])
    assert e.value.reason is Reason.TOO_FEW_UPDATES
    bad = ClientResult("site-x", {k: v for k, v in list(base.items())[:-1]}, 5)
    with pytest.raises(OneShotError) as e:
        strat.aggregate(1, base, [bad])
    assert e.value.reason is Reason.SHAPE_MISMATCH
