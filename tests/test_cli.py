"""The CLI: every registered command imports, explains itself, and user errors print one line."""
import subprocess
import sys

import pytest

from arbooth import cli


def test_every_available_command_has_help(capsys):
    available = cli._available_commands()
    for name in available:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"arbooth {name}" in out and len(out.splitlines()) > 3, name


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "arbooth.cli", "--help"], capture_output=True, text=True, check=True)
    assert "<command>" in out.stdout
    for name in cli._available_commands():
        assert name in out.stdout


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: arbooth" in capsys.readouterr().out
