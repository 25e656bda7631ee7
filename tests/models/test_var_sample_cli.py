"""`arbooth sample` end to end on the tiny random model, and its clear errors."""
from __future__ import annotations

from pathlib import Path

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


def _pixels(path):
    import numpy as np
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sample_same_seed_same_images_at_batch_sizes_1_and_4(tmp_path):
    """Image k uses seed + k whatever the batch size (issue 19.1: images differed by up to 255/255).
    Right value: the same tokens, so the PNGs agree up to the rounding of float noise from batched
    arithmetic (at most 1 grey level, in a handful of pixels)."""
    for bs in (1, 4):
        assert main(["sample", "--tiny", "--classes", "1", "4", "--per-class", "2", "--seed", "3",
                     "--batch-size", str(bs), "--out", str(tmp_path / f"g{bs}.png"),
                     "--out-dir", str(tmp_path / f"s{bs}")]) == 0
    names = sorted(p.name for p in (tmp_path / "s1").iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "s4").iterdir())
    for name in names:
        diff = abs(_pixels(tmp_path / "s1" / name) - _pixels(tmp_path / "s4" / name))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, diff.max(), (diff > 0).mean())
    assert abs(_pixels(tmp_path / "g1.png") - _pixels(tmp_path / "g4.png")).max() <= 1
    assert abs(_pixels(tmp_path / "s1" / names[0]) - _pixels(tmp_path / "s1" / names[1])).max() > 20  # seeds differ


def test_sample_repeated_classes_never_overwrite(tmp_path):
    """--classes 0 0 0 0 --per-class 1 wrote one file (issue 19.2): now four distinct names and images."""
    assert main(["sample", "--tiny", "--classes", "0", "0", "0", "0", "--per-class", "1",
                 "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "s")]) == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["class0000_00.png", "class0000_01.png", "class0000_02.png", "class0000_03.png"]
    assert (_pixels(tmp_path / "s" / names[0]) != _pixels(tmp_path / "s" / names[3])).any()


def test_sample_out_of_range_arguments_are_one_line(tmp_path, capsys):
    """--top-p 1.5 sampled unfiltered and exited 0 (issue 19.4)."""
    for flag, value, msg in (("--top-p", "1.5", "top_p must be in [0, 1]"), ("--top-k", "-3", "top_k must be"),
                             ("--cfg", "-1", "cfg must be a finite number >= 0"), ("--cfg", "nan", "cfg must be")):
        capsys.readouterr()
        assert main(["sample", "--tiny", flag, value, "--out", str(tmp_path / "g.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert not (tmp_path / "g.png").exists()


def test_sample_unwritable_output_fails_before_any_model_loads(tmp_path, capsys):
    """Found only after all the work, as a traceback (issue 19.3). Missing checkpoints prove the order:
    the output error comes first, and nothing is written."""
    (tmp_path / "file.png").write_bytes(b"not a folder")
    ckpts = ["--vae-ckpt", str(tmp_path / "missing_vae.pth"), "--var-ckpt", str(tmp_path / "missing_var.pth")]
    cases = [(["--out", str(tmp_path / "file.png" / "grid.png")], "file.png is a file, not a folder"),
             (["--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "file.png" / "s")], "not a folder")]
    if Path("/dev/full").exists():
        cases.append((["--out", "/dev/full"], "not a regular file"))
    for out_args, msg in cases:
        capsys.readouterr()
        assert main(["sample", *ckpts, *out_args]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "checkpoint" not in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]
