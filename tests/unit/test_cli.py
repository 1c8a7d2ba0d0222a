"""The command table: every command and benchmark resolves to a callable, and the CLI reports
unknown commands and config errors in words with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pertscale.bench import BENCHES
from pertscale.bench import main as bench_main
from pertscale.cli import COMMANDS, main, resolve


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves(name):
    assert callable(resolve(COMMANDS[name][0]))


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_every_benchmark_resolves(name):
    assert callable(resolve(BENCHES[name]))


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_and_benchmark_fail_with_the_choices(capsys):
    assert main(["pretrian"]) == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err
    assert bench_main(["loadr"]) == 2
    assert f"choices: {sorted(BENCHES)}" in capsys.readouterr().err and "gears" in BENCHES


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "pertscale", "--help"], capture_output=True, check=False,
                         text=True, timeout=60)
    assert out.returncode == 0 and "usage: pertscale" in out.stdout


def test_expected_failures_are_one_line_and_debug_keeps_the_traceback(tmp_path, capsys,
                                                                      monkeypatch):
    from pertscale.cli import main, one_line

    missing = str(tmp_path / "nostore")
    assert main(["stats", missing]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pertscale stats: error: ") and missing in err[0]
    with pytest.raises(ValueError, match="nostore"):
        main(["--debug", "stats", missing])
    monkeypatch.setenv("PERTSCALE_DEBUG", "1")
    with pytest.raises(ValueError, match="nostore"):
        main(["stats", missing])
    # an OSError names its path and reason; a Ray task's error is its cause's message
    assert one_line(PermissionError(13, "Permission denied", "/x/y")) == \
        "/x/y: Permission denied"

    class TaskError(ValueError):
        def __init__(self, cause):
            super().__init__("remote traceback\n  line 1\n  line 2")
            self.cause = cause

    assert one_line(TaskError(ValueError("gene 'XYZ' is not in the store"))) == \
        "gene 'XYZ' is not in the store"
