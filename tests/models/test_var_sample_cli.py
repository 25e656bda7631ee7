"""`arbooth sample` end to end on the tiny random model, and its clear errors."""
from __future__ import annotations

from PIL import Image

from arbooth.cli import main


def test_sample_tiny_writes_grid_and_singles(tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--tiny", "--classes", "1", "4", "--per-class", "1", "--batch-size", "1",
               "--top-k", "10", "--out", str(out), "--out-dir", str(tmp_path / "singles")])
    assert rc == 0
    grid = Image.open(out)
    assert grid.size == (64 + 2 * 2, 2 * 64 + 3 * 2)  # one image per row (per class), 2-pixel padding
    singles = sorted(p.name for p in (tmp_path / "singles").iterdir())
    assert singles == ["class0001_00.png", "class0004_00.png"]
    assert "wrote 2 images" in capsys.readouterr().out


def test_sample_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path / "g.png")]) == 2
    assert "pass --vae-ckpt and --var-ckpt" in capsys.readouterr().err
    assert main(["sample", "--vae-ckpt", str(tmp_path / "a.pth"), "--var-ckpt", str(tmp_path / "b.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["sample", "--tiny", "--classes", "12", "--out", str(tmp_path / "g.png")]) == 2
    assert "classes [12] outside [0, 9]" in capsys.readouterr().err
