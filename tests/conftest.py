from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mqtt_broker import Broker, mosquitto

from learning.data_path import find_data_file


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
