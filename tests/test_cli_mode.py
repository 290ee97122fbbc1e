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


@pytest.mark.parametrize("args", [["--chunk-bytes", "512"], ["--chunk-bytes", str(9 * 2**20)],
                                  ["--upload-window", "0"], ["--upload-window", "2000"]])
def test_bad_upload_chunking_is_a_configuration_error(tmp_path: Path, args: list[str]) -> None:
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["coordinator", "--state", str(state), "--broker", "127.0.0.1:1", *args])
    assert result.exit_code == 2, result.output
    assert "--chunk-bytes must be 1024..8388608 and --upload-window 1..1024" in result.output
    assert not state.exists()
