from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tools/ (not an installed package)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mqtt_broker import Broker, mosquitto

from learning.data_path import find_data_file

#: How often a failed multi-process test runs again (see ``pytest_collection_modifyitems``).
PROCESS_TEST_RERUNS = 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Rerun a failed multi-process test once; never a unit test.

    Tests marked ``integration`` or using a private broker run a coordinator, agents and brokers as
    separate processes against each other on a 2-core machine, where their relative timing is the
    one thing a test cannot pin down. One failure of such a test is rerun (pytest-rerunfailures);
    the rerun is listed in the summary (``-rR``: "RERUN") and is a bug to chase, not a pass to
    forget. A test that fails twice fails the run.
    """
    for item in items:
        if item.get_closest_marker("integration") is not None or "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.flaky(reruns=PROCESS_TEST_RERUNS, reruns_delay=1))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private mosquitto on a free loopback port, killed after the test."""
    with mosquitto(tmp_path) as b:
        yield b


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    p = find_data_file("pneumoniamnist.npz")
    if p is None:
        pytest.skip("../shared/data/pneumoniamnist.npz not found (set FEDSCAN_DATA)")
    return p
