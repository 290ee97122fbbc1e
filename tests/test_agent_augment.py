"""The box trains with its profile's augmentation and normalization (issue 16 item 2, runtime side).

The agent's training job hands the profile's MONAI augmentation to the trainer (not only the
benches do), which applies it when the round's ``training.augment`` is on, and the profile's
``normalize`` step, the one serving applies; a profile without an augmentation section has none.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import tiny_trust, tiny_v0

import learning.local_update as local_update
from edge_agent.agent import AgentSettings, EdgeAgent
from firmware.profile import AugmentSpec, find_profile
from learning.augment import BatchAugment
from learning.datasets import make_synthetic
from protocol.messages import Task, TrainingConfig
from protocol.transport import MemoryBroker, MemoryTransport


@pytest.mark.parametrize("augment_round, with_section", [(True, True), (False, True), (True, False)])
def test_training_job_passes_the_profile_augmentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      augment_round: bool, with_section: bool) -> None:
    spec = AugmentSpec(flip=True, brightness=0.1)
    profile = find_profile("xray-cxr-28")
    if with_section:
        profile = profile.model_copy(update={"augmentation": spec})
    seen: list[dict[str, Any]] = []
    real = local_update.train_local

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append({**kw, "cfg": args[2]})
        return real(*args, **kw)

    monkeypatch.setattr(local_update, "train_local", spy)
    manifest, weights = tiny_v0()
    t = MemoryTransport(MemoryBroker(), "a1")
    t.connect()
    data = make_synthetic(32, seed=1)
    agent = EdgeAgent(AgentSettings("a1", profile, tmp_path, threads=1, trust=tiny_trust()), t, data)
    agent.installer.install(manifest, weights)
    task = Task(round_id=1, base_version="v0", deadline=time.time() + 60,
                training=TrainingConfig(batch_size=16, lr=0.05, max_steps=2, augment=augment_round))
    agent.training.run(task, data, "u-1")
    (kw,) = seen
    assert kw["normalize"] == ([0.5], [0.25])  # the profile's normalize step, as serving applies it
    assert kw["cfg"].augment is augment_round  # train_local augments only when the round asks
    if with_section:
        assert isinstance(kw["augment"], BatchAugment) and kw["augment"].spec == spec
    else:
        assert kw["augment"] is None
