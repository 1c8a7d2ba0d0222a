"""The quickstart pipeline: a failing step stops it with an error naming the step and the exact
`pertscale` command line, and nothing after that step runs."""

from __future__ import annotations

import pytest

from pertscale.config import ConfigError
from pertscale.pipeline import QuickstartConfig, QuickstartError, main, run_quickstart


def test_failing_step_names_its_command_and_stops(tmp_path):
    cfg = QuickstartConfig(workdir=str(tmp_path / "w"), steps=["verify", "stats"])
    with pytest.raises(QuickstartError,
                       match=rf"step 'verify' failed .*command: pertscale verify {tmp_path}/w/store"):
        run_quickstart(cfg)
    assert not (tmp_path / "w" / "stats").exists()


def test_cli_reports_a_failed_step_without_a_traceback(tmp_path, storage_dir, capsys):
    assert main([f"--workdir={tmp_path / 'w'}", '--steps=["verify"]']) == 1
    assert "pertscale quickstart: quickstart step 'verify' failed" in capsys.readouterr().err


def test_unknown_step_is_a_config_error():
    with pytest.raises(ConfigError, match=r"steps\[\]='train' is not one of"):
        QuickstartConfig(steps=["train"])
