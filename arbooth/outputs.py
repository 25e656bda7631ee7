"""Writing outputs safely, shared by every command that writes files.

- `check_output(path)`: before any model loads or any work starts, check that a file (or folder) can be
  written there: no regular file in the way of its folder, not a device or folder itself, a writable
  folder with free space (probed by writing and removing a small temporary file). Fast (no model, no
  data), and it creates nothing.
- `refuse_inputs(outputs, inputs)` / `refuse_nested(out_dir, in_dir)` / `distinct_outputs(paths)`: an
  output may never be (or overwrite) one of the command's inputs, nor another output of the same run.
- `atomic_write(path, write)`: temp file in the same folder + `os.replace`, so a crash or a full disk
  never leaves half a file; an I/O failure becomes one `OutputError` line naming the folder, the free
  space and the space needed. `atomic_write_many` writes files that belong together: all or none.
  Every file gets the mode the umask gives a new file (also safetensors, whose writer leaves 0600).
  `save_image` and `write_text` are the two common cases.

Errors: `OutputError` (an `ArboothError`: the CLI prints one line and exits with code 2).
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from arbooth.errors import OutputError

if TYPE_CHECKING:
    from PIL import Image

_PROBE_BYTES = 4096


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(path: str | os.PathLike, *, folder: bool = False, what: str = "output") -> Path:
    """Check that `path` (a file, or with `folder=True` a folder) can be written; returns it.

    Raises OutputError (one line) when it cannot: a regular file stands where a folder must be
    (`out.png/x.png` under a file `out.png`), the path is a folder (file expected) or a file (folder
    expected), a device or pipe (`/dev/full`), the folder is read-only, or the disk is full."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise OutputError(f"cannot write {what} folder {path}: it exists and is not a folder")
        if not folder and path.is_dir():
            raise OutputError(f"cannot write {what} {path}: it is a folder")
        if not folder and not path.is_file():
            raise OutputError(f"cannot write {what} {path}: it is not a regular file (a device, pipe or socket)")
    base = _nearest_existing(path if folder else path.parent)
    if not base.is_dir():
        raise OutputError(f"cannot write {what} {path}: {base} is a file, not a folder")
    try:
        if shutil.disk_usage(base).free < _PROBE_BYTES:
            raise OutputError(f"cannot write {what} {path}: no space left on the device of {base}")
        fd, probe = tempfile.mkstemp(dir=base, prefix=".arbooth-write-test-")
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {base}: {e.strerror or e}") from None
    return path


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also hard links and symlinks
    return a.resolve() == b.resolve()


def refuse_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None]) -> None:
    """OutputError if an output is one of the input files, or an input folder's file (recursively)."""
    files: list[Path] = []
    for i in inputs:
        if i is None:
            continue
        i = Path(i)
        files.extend(p for p in i.rglob("*") if p.is_file()) if i.is_dir() else files.append(i)
    for out in outputs:
        out = Path(out)
        for f in files:
            if _same(out, f):
                raise OutputError(f"refusing to write {out}: it would overwrite the input {f}")


def refuse_nested(out_dir: str | os.PathLike, in_dir: str | os.PathLike | None, *, what: str = "input") -> None:
    """OutputError if output folder `out_dir` is `in_dir`, lies inside it, or contains it: outputs would
    then be read back as inputs (or inputs overwritten)."""
    if in_dir is None:
        return
    out, inp = Path(out_dir).resolve(), Path(in_dir).resolve()
    if out == inp or inp in out.parents or out in inp.parents:
        raise OutputError(f"refusing to write into {out_dir}: it overlaps the {what} folder {in_dir}")


def distinct_outputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The paths, checked to be pairwise different (one output of a run never overwrites another)."""
    seen: dict[Path, Path] = {}
    out = []
    for p in paths:
        p = Path(p)
        key = p.resolve()
        if key in seen:
            raise OutputError(f"two outputs of this run would be written to the same file {p}")
        seen[key] = p
        out.append(p)
    return out


# torch.save and safetensors report a failed write (full disk, file size limit) as RuntimeError /
# SafetensorError with these words in the text, not as OSError (torch: "[enforce fail at
# inline_container.cc:672] . unexpected pos"; safetensors: "I/O error: No space left on device").
_WRITE_FAILURES = ("unexpected pos", "I/O error", "iostream error", "No space left", "file write failed",
                   "File too large")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _write_failure(e: BaseException, paths: list[Path], need: int | None) -> OutputError | None:
    """One OutputError line for a failed write of `paths` (None when `e` is not an I/O failure): the
    folder, the reason, the free space there and, when known, about how much the files need."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if not isinstance(e, OSError) and not any(w in text for w in _WRITE_FAILURES):
        return None
    folder = paths[0].parent
    try:
        free = _mb(shutil.disk_usage(_nearest_existing(folder)).free) + " free"
    except OSError:
        free = "free space unknown"
    needed = f", about {_mb(need)} needed" if need else ""
    names = str(paths[0]) if len(paths) == 1 else ", ".join(p.name for p in paths) + f" in {folder}"
    reason = text.splitlines()[0] if text else type(e).__name__
    if "unexpected pos" in reason or "enforce fail" in reason:
        reason = "the write stopped short (disk full?)"
    return OutputError(f"cannot write {names}: {reason} ({free} in {folder}{needed}); nothing there was "
                       "changed")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, size: int | None = None) -> Path:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it onto `path`.

    Creates missing parent folders. On any error the temporary file is removed and `path` is left as
    it was; an I/O failure (full disk, permissions, a file in the way, torch's or safetensors' failed
    write) becomes a one-line OutputError naming the folder, the free space and `size` (bytes, about what
    the file needs) when given. The file's mode follows the umask like any other (`write` may replace the
    temporary file: safetensors' `save_file` leaves mode 0600)."""
    return atomic_write_many([(path, write)], size=size)[0]


def atomic_write_many(items: Iterable[tuple[str | os.PathLike, Callable[[str], object]]], *,
                      size: int | None = None) -> list[Path]:
    """Write files that belong together (a personalization and its training state): every file is first
    written to a temporary file beside it, and only when all are complete are they renamed into place, so
    a failed write (a full disk) leaves all of them as they were. Errors as `atomic_write`."""
    items = [(Path(p), w) for p, w in items]
    tmps: list[str] = []
    try:
        try:
            for path, write in items:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
                # os.open with mode 0o666 (not mkstemp's 0o600): the umask decides, as for any new file
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                tmps.append(tmp)
                mode = os.stat(tmp).st_mode & 0o777
                write(tmp)
                os.chmod(tmp, mode)  # the writer may have replaced the file with its own mode
            for (path, _), tmp in zip(items, tmps, strict=True):
                os.replace(tmp, path)
        except Exception as e:  # only I/O failures are converted (_write_failure), the rest re-raised
            err = _write_failure(e, [p for p, _ in items], size)
            if err is None:
                raise
            raise err from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [p for p, _ in items]


def image_format(path: str | os.PathLike) -> str:
    """PIL format name for the file's extension ('.png' -> 'PNG'); OutputError for an unknown one."""
    from PIL import Image  # only here: config and checkpoint import this module too

    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise OutputError(f"cannot write image {path}: unknown image extension {suffix or '(none)'!r}; use .png")
    return fmt


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Atomically save a PIL image; the format follows the extension."""
    fmt = image_format(path)
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
