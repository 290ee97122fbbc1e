"""Settings a round could never aggregate with are refused at start-up, exit 2, before anything
is created (issue 15 item 4); the sample-count cap is configurable and checked (item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.model_repo import ModelRepository
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.store import BlobStore, open_store
from coordinator.strategies import build_strategy, check_round_size, strategy_options
from fedscan.cli import app
from protocol.manifest import InputSpec
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport


@pytest.mark.parametrize(("args", "message"), [
    (["--strategy", "krum", "--min-clients", "2"], "krum needs at least 5 updates per round"),
    (["--strategy", "multikrum", "--min-clients", "4"], "multikrum needs at least 5 updates per round"),
    (["--max-weight-ratio", "0.5"], "max weight ratio"),
])
def test_impossible_strategy_settings_exit_2_before_anything_is_created(tmp_path: Path, args: list[str],
                                                                        message: str) -> None:
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["coordinator", "--state", str(state), "--broker", "127.0.0.1:1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not state.exists()


def test_round_size_check() -> None:
    check_round_size(build_strategy("krum", f=1), 5)
    check_round_size(build_strategy("fedavg"), 1)
    with pytest.raises(ValueError, match="needs at least 7"):
        check_round_size(build_strategy("multikrum", f=2), 6)
    assert strategy_options("fedavg", max_weight_ratio=None) == {"count_cap": None}
    assert strategy_options("krum", max_weight_ratio=4.0) == {}  # one vote each: nothing to cap


def test_the_coordinator_refuses_a_round_size_its_strategy_cannot_aggregate(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    spec = ModelSpec("small_cnn", {"in_channels": 1, "num_classes": 2, "width": 4}, ["a", "b"],
                     InputSpec(channels=1, height=28, width=28))
    try:
        with pytest.raises(ValueError, match="krum needs at least 5"):
            Coordinator(store=store, blobs=BlobStore(tmp_path / "blobs"), repo=ModelRepository(tmp_path / "models"),
                        transport=MemoryTransport(MemoryBroker(), "coordinator"), topics=Topics("t"),
                        strategy=build_strategy("krum"), settings=RoundSettings(min_clients=3), model_spec=spec,
                        initial_tensors=dict)
    finally:
        store.close()
