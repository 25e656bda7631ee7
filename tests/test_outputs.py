"""arbooth/outputs.py: output checks before the work, refusals of input overlap, atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from arbooth.errors import OutputError
from arbooth.outputs import (
    atomic_write,
    check_output,
    distinct_outputs,
    refuse_inputs,
    refuse_nested,
    save_image,
    write_text,
)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_check_output_accepts_new_paths_and_creates_nothing(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "grid.png") == tmp_path / "a" / "b" / "grid.png"
    check_output(tmp_path / "run", folder=True)
    (tmp_path / "old.png").write_bytes(b"x")
    check_output(tmp_path / "old.png")  # an existing file may be replaced (atomically)
    assert _listing(tmp_path) == ["old.png"]  # the probe file is gone, no folder was made


def test_check_output_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "out.png").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"out\.png is a file, not a folder"):
        check_output(tmp_path / "out.png" / "sub" / "x.png")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output(tmp_path / "out.png", folder=True)
    with pytest.raises(OutputError, match="it is a folder"):
        check_output(tmp_path)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_check_output_refuses_a_device():
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/full")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            check_output(ro / "new" / "x.png")
    finally:
        ro.chmod(0o755)


def test_refusals(tmp_path):
    result = tmp_path / "result"
    (result / "sub").mkdir(parents=True)
    (result / "sub" / "adapter.safetensors").write_bytes(b"x")
    ckpt = tmp_path / "base.pth"
    ckpt.write_bytes(b"x")
    with pytest.raises(OutputError, match="would overwrite the input"):
        refuse_inputs([tmp_path / "result" / "sub" / ".." / "sub" / "adapter.safetensors"], [result])
    with pytest.raises(OutputError, match="would overwrite the input"):
        refuse_inputs([ckpt], [None, ckpt])
    (tmp_path / "link.pth").symlink_to(ckpt)
    with pytest.raises(OutputError, match="would overwrite the input"):
        refuse_inputs([tmp_path / "link.pth"], [ckpt])
    refuse_inputs([result / "merged.safetensors", tmp_path / "new.pth"], [result, ckpt])  # new files are fine
    for out in (result, result / "x", tmp_path):
        with pytest.raises(OutputError, match="overlaps the data folder"):
            refuse_nested(out, result, what="data")
    refuse_nested(tmp_path / "elsewhere", result)
    with pytest.raises(OutputError, match="same file"):
        distinct_outputs([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "." / "a.png"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    write_text(target, "old")

    def failing(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*report\.json: No space left on device"):
        atomic_write(target, failing)
    assert target.read_text() == "old" and _listing(tmp_path) == ["report.json"]  # no temp file left
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert target.read_text() == "old" and _listing(tmp_path) == ["report.json"]


def test_save_image_format_from_extension(tmp_path):
    im = Image.new("RGB", (4, 4), (10, 20, 30))
    save_image(im, tmp_path / "a" / "x.png")
    assert Image.open(tmp_path / "a" / "x.png").format == "PNG"
    with pytest.raises(OutputError, match="unknown image extension"):
        save_image(im, tmp_path / "grid")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a" / "x.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def _umask(mask: int):
    import contextlib

    @contextlib.contextmanager
    def cm():
        old = os.umask(mask)
        try:
            yield
        finally:
            os.umask(old)
    return cm()


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_every_writer_gives_the_umask_mode_also_safetensors(tmp_path, mask):
    """Issue 28 kind 8: safetensors' save_file replaces the temporary file with a 0600 one."""
    import torch

    from arbooth.checkpoint import save_safetensors, save_torch
    from arbooth.outputs import save_image, write_text

    with _umask(mask):
        save_safetensors({"a": torch.zeros(3)}, tmp_path / "w.safetensors")
        save_torch({"a": torch.zeros(3)}, tmp_path / "s.pt")
        write_text(tmp_path / "t.yaml", "x: 1\n")
        save_image(Image.new("RGB", (2, 2)), tmp_path / "i.png")
        reference = tmp_path / "plain"
        reference.write_text("")  # what any program's new file gets
    want = reference.stat().st_mode & 0o777
    assert want == 0o666 & ~mask
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == \
        {p.name: oct(want) for p in tmp_path.iterdir()}


@pytest.mark.parametrize("message", ["[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534",
                                     "basic_ios::clear: iostream error",
                                     "Error while serializing: I/O error: No space left on device (os error 28)"])
def test_a_failed_write_of_files_that_belong_together_is_one_line_and_changes_none(tmp_path, message):
    """Issue 28 kind 9: torch.save and safetensors report a full disk as RuntimeError/SafetensorError."""
    from arbooth.outputs import atomic_write_many

    (tmp_path / "a.bin").write_text("old a")
    (tmp_path / "b.bin").write_text("old b")

    def fails(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError(message)
    with pytest.raises(OutputError) as e:
        atomic_write_many([(tmp_path / "a.bin", lambda t: Path(t).write_text("new a")),
                           (tmp_path / "b.bin", fails)], size=3 * 2**20)
    text = str(e.value)
    assert "\n" not in text and f"in {tmp_path}" in text and "MB free" in text and "3.0 MB needed" in text
    assert (tmp_path / "a.bin").read_text() == "old a" and (tmp_path / "b.bin").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temporary file left
    with pytest.raises(ValueError, match="not an I/O"):  # any other error is not disguised
        atomic_write_many([(tmp_path / "c.bin", lambda t: (_ for _ in ()).throw(ValueError("not an I/O")))])
