"""The fleet serves the best validated model, not the latest (issue 16 item 3, coordinator side).

:class:`coordinator.rounds.publishing.ModelPublisher` with ``select_metric="val_auc"`` and
auto rollout: a round model whose validation AUC is not above the served model's is recorded a
``candidate`` and no desired shadow moves; a better one becomes ``active`` and every agent's desired
shadow points at it; a box enrolled later adopts the best, not the latest. Without a metric the
latest is served, as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.model_repo import ModelRepository
from coordinator.rounds import ModelSpec, RoundSettings
from coordinator.rounds.publishing import ModelPublisher
from coordinator.states import ModelState
from coordinator.store import Store, open_store
from coordinator.strategies import build_strategy
from protocol.codec import Tensors
from protocol.manifest import InputSpec
from protocol.messages import Shadow
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

SPEC = ModelSpec("small_cnn", {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "group"}, ["a", "b"],
                 InputSpec(channels=1, height=28, width=28))


def tensors(tag: float) -> Tensors:
    """A stand-in model whose 'validation AUC' the evaluator reads back from its one tensor."""
    return {"w": np.full((2,), tag, dtype=np.float32)}


def rig(tmp: Path, select: str | None) -> tuple[Store, ModelPublisher, MemoryBroker, Topics]:
    store = open_store(f"sqlite:///{tmp / 'state.db'}")
    for a in ("box-1", "box-2"):
        store.enroll_agent(a, "xray-cxr-28", [])
    broker, topics = MemoryBroker(), Topics("f")
    transport = MemoryTransport(broker, "coordinator")
    transport.connect()
    pub = ModelPublisher(store=store, repo=ModelRepository(tmp / "models"), transport=transport, topics=topics,
                         spec=SPEC, settings=RoundSettings(select_metric=select),
                         evaluator=lambda t: {"val_auc": float(t["w"][0]), "val_accuracy": 0.5})
    pub.ensure_initial_model(lambda: tensors(0.5), build_strategy("fedavg"))
    return store, pub, broker, topics


def close_round(store: Store, pub: ModelPublisher, round_id: int, auc: float) -> None:
    store.create_round(round_id, base_version=f"v{round_id - 1}", config={}, deadline=1e12)
    t = tensors(auc)
    m = pub.manifest_for(f"v{round_id}", f"v{round_id - 1}", round_id, t, pub.evaluate(t), ["box-1"])
    pub.save(m, t, build_strategy("fedavg"), round_id=round_id)
    pub.publish(m.version)


def desired(store: Store, broker: MemoryBroker, topics: Topics, agent: str) -> str | None:
    rec = store.get_agent(agent)
    assert rec is not None
    retained = dict(broker.retained(topics.shadow_desired(agent)))
    wire = Shadow.model_validate_json(retained[topics.shadow_desired(agent)]).version
    assert wire == rec.desired_version, "the retained shadow and the store agree"
    return rec.desired_version


def test_best_validated_round_serves_and_worse_rounds_do_not(tmp_path: Path) -> None:
    store, pub, broker, topics = rig(tmp_path, "val_auc")
    close_round(store, pub, 1, 0.70)
    assert desired(store, broker, topics, "box-1") == "v1"
    close_round(store, pub, 2, 0.62)  # the federated curve swings down: v1 stays served
    assert desired(store, broker, topics, "box-1") == desired(store, broker, topics, "box-2") == "v1"
    assert store.get_model("v2").state == ModelState.CANDIDATE  # type: ignore[union-attr]
    assert broker.retained(topics.model_manifest("v2"))  # still announced: agents train from it
    close_round(store, pub, 3, 0.70)  # a tie keeps the older model
    assert desired(store, broker, topics, "box-2") == "v1"
    close_round(store, pub, 4, 0.81)
    assert desired(store, broker, topics, "box-1") == desired(store, broker, topics, "box-2") == "v4"
    assert [m.version for m in store.list_models() if m.state == ModelState.ACTIVE] == ["v0", "v1", "v4"]
    close_round(store, pub, 5, 0.75)
    latest_active = store.latest_model(state=ModelState.ACTIVE)  # what a box enrolled later adopts
    assert latest_active is not None and latest_active.version == "v4"
    assert len(store.list_events("model_not_selected")) == 3  # v2, v3, v5, each audited


def test_below_the_initial_model_is_not_served(tmp_path: Path) -> None:
    store, pub, broker, topics = rig(tmp_path, "val_auc")
    close_round(store, pub, 1, 0.40)  # worse than the random initial model (0.5 here)
    assert desired(store, broker, topics, "box-1") == "v0"


@pytest.mark.parametrize("select", [None, "val_missing_metric"])
def test_latest_serves_without_a_metric(tmp_path: Path, select: str | None) -> None:
    store, pub, broker, topics = rig(tmp_path, select)
    close_round(store, pub, 1, 0.70)
    close_round(store, pub, 2, 0.60)
    assert desired(store, broker, topics, "box-1") == "v2"
