"""learning.anomaly.site_state: the site's local tensors and thresholds survive a restart; junk is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from learning.anomaly.errors import AnomalyError
from learning.anomaly.model import AEConfig, ShareRule, build_ae, get_named, local_names, set_named
from learning.anomaly.scoring import SiteThresholds
from learning.anomaly.site_state import SiteState, load_site_state, save_site_state
from protocol.errors import Reason


def test_round_trip_restores_the_local_branch_bit_exactly(tmp_path: Path) -> None:
    cfg = AEConfig(size=16, shape_widths=(8, 8), app_widths=(4, 4))
    trained, fresh = build_ae(cfg, seed=1), build_ae(cfg, seed=2)
    names = local_names(trained, ShareRule.FEDDIS)
    thr = SiteThresholds(image=0.12, pixel=0.3, percentile=95.0, pixel_percentile=99.0, n_normal=47)
    save_site_state(tmp_path / "site.npz", SiteState(get_named(trained, names), thr, "v7"))
    back = load_site_state(tmp_path / "site.npz")
    assert back.thresholds == thr and back.base_version == "v7" and list(back.local) == names
    set_named(fresh, back.local)
    after = get_named(fresh, names)
    assert all(np.array_equal(after[n], get_named(trained, names)[n]) for n in names)
    save_site_state(tmp_path / "cold.npz", SiteState({}, None, "v0"))
    assert load_site_state(tmp_path / "cold.npz").thresholds is None


@pytest.mark.parametrize("content", [b"", b"not an npz", None])
def test_junk_is_refused_with_bad_frame(tmp_path: Path, content: bytes | None) -> None:
    p = tmp_path / "x.npz"
    if content is None:
        np.savez(p, a=np.zeros(3))  # an npz, but not a site state
    else:
        p.write_bytes(content)
    with pytest.raises(AnomalyError) as e:
        load_site_state(p)
    assert e.value.reason is Reason.BAD_FRAME
