"""The CLI: every registered command imports, explains itself, and user errors print one line."""
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("argv", [["sample", "--tiny", "--out", "/dev/full"],
                                  ["generate", "--prompt", "a dog", "--out", "/dev/full"]])
def test_unwritable_output_fails_before_torch_is_imported(argv: list[str]) -> None:
    """Issue 19: a bad output fails at once (one line, exit 2), before the command imports torch."""
    code = (f"import sys; from arbooth.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1], check=False)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "/dev/full" in r.stderr
