"""The coordinator refuses a round mode or staleness bound it does not know, before touching anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedscan.cli import app


@pytest.mark.parametrize("args", [["--mode", "sometimes"], ["--mode", "async", "--max-staleness", "-1"]])
def test_bad_round_mode_is_a_configuration_error(tmp_path: Path, args: list[str]) -> None:
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["coordinator", "--state", str(state), "--broker", "127.0.0.1:1", *args])
    assert result.exit_code == 2, result.output
    assert "--mode must be sync or async" in result.output
    assert not state.exists()
