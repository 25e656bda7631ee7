"""Sample folders that know what made them: resumable, never stale (issue 24, scope 2).

Every command that samples images into a folder and then scores them (eval-subject --model, eval-class
--model/--result, bench-subject) keeps the folder through `SampleFolder`:

- `sample_folder.json` holds the folder's IDENTITY: what made its images — the model or personalization
  (file name and SHA-256, never an absolute path), the prompt set, the seed rule, every sampling setting
  that changes pixels (guidance, tau, top_k, top_p, dtype, ...), the protocol. Written once, atomically.
  Opening the folder with another identity is refused with one line naming the keys that differ
  (`SampleFolderError`), unless `overwrite=True`: then the images its records name, the records and the
  identity are removed and the folder starts anew. A folder written before identities were recorded
  (a `manifest.jsonl` and no `sample_folder.json`) is refused the same way: its origin is unknown.
- `records.jsonl` (or `records-<writer>.jsonl`, one per writing process) holds one JSON line per image:
  `prompt`, `seed`, `file` (relative to the folder), the PNG's `sha256`, `size` and `mtime_ns`, and any
  extra fields the caller gives (e.g. the class label). An image is written atomically BEFORE its line
  is appended, so a crash leaves at most an image without a line (sampled again) or a torn last line
  (ignored on read), never a line without its image.
- Reading deduplicates by (prompt, seed): the last line whose file is still on disk with the recorded
  bytes wins. An image that was deleted, truncated or replaced counts as missing (`missing`) and is
  never scored (`records`); sampling it again REPLACES its record (the records file is rewritten
  atomically without the old line), so one (prompt, seed) is always one record.

Keys are (prompt, seed) pairs: for subject samples the prompt template and the image's seed, for class
samples the class name and the image's seed. A caller asks `missing(keys)` for what to sample, `add`s
each image, and scores `records(keys)`: only the images of the keys asked for, so shrinking a request
never scores the leftovers of a larger one.

Several processes may fill one folder when each passes its own `writer` name and samples its own keys
(and only one of them passes `overwrite`); reading merges every records file.

Imports only the standard library and `arbooth.outputs`/`errors` (the bottom layers).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arbooth.errors import ArboothError
from arbooth.outputs import save_image, write_text

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IDENTITY_FILE = "sample_folder.json"
RECORDS_PREFIX = "records"
LEGACY_MANIFEST = "manifest.jsonl"  # written by eval-subject/eval-class --model before identities
FORMAT_VERSION = 1

Key = tuple[str, int]


class SampleFolderError(ArboothError):
    """A sample folder holds images made by another model, prompt set or setting (or of unknown origin)."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (16 MiB chunks). The same as `arbooth.checkpoint.file_sha256`,
    repeated here because this module sits beside `checkpoint` in the layers, not above it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: str | os.PathLike | None) -> dict[str, str] | None:
    """{"name", "sha256"} of a model file (its name only: moving it keeps the identity), or the
    SHA-256 of every file of a folder (a result folder); None for None (random weights)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}|{file_sha256(f)}\n".encode())
        return {"name": path.name, "sha256": h.hexdigest()}
    return {"name": path.name, "sha256": file_sha256(path)}


def _canonical(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity as it reads back from JSON (tuples become lists, keys strings)."""
    try:
        return json.loads(json.dumps(dict(identity), sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ArboothError(f"a sample folder identity must be plain JSON values: {e}") from None


def _short(value: Any) -> str:
    """A value for a one-line message: a file identity as name@sha256-prefix, others as JSON, shortened."""
    if isinstance(value, dict) and set(value) == {"name", "sha256"}:
        return f"{value['name']}@{str(value['sha256'])[:12]}"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 48 else text[:45] + "..."


def identity_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'key: stored -> wanted' for every top-level key whose value differs (absent counts as null)."""
    return [f"{k}: {_short(stored.get(k))} there, {_short(wanted.get(k))} now"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


def stored_identity(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The identity a folder records, or None when it records none."""
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        return dict(meta["identity"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SampleFolderError(f"{path} is damaged ({type(e).__name__}); remove the folder or pass "
                                "--overwrite") from None


def _slug(text: str) -> str:
    """A readable, file-safe folder name for a prompt or class name, unique by a hash of the full text."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "prompt"
    return f"{words}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class SampleFolder:
    """A folder of sampled images with the identity of what made them (module docstring).

    `folder`: created when absent. `identity`: a JSON-able dict of everything that changes pixels.
    `overwrite`: discard a folder of another identity instead of refusing it. `writer`: the records
    file this process appends to (one per process when several fill the folder). `overwrite_flag`:
    the option named in the refusal. Raises SampleFolderError (one line) for another identity."""

    def __init__(self, folder: str | os.PathLike, identity: Mapping[str, Any], *, overwrite: bool = False,
                 writer: str | None = None, overwrite_flag: str = "--overwrite"):
        self.folder = Path(folder)
        self.identity = _canonical(identity)
        if writer is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", writer):
            raise ArboothError(f"sample folder writer name {writer!r}: use letters, digits, '_', '.', '-'")
        self._records_path = self.folder / (f"{RECORDS_PREFIX}-{writer}.jsonl" if writer
                                            else f"{RECORDS_PREFIX}.jsonl")
        self._recorded_keys: set[Key] | None = None  # keys with a line in some records file (read on first add)
        stored = stored_identity(self.folder)
        legacy = stored is None and (self.folder / LEGACY_MANIFEST).is_file()
        if (stored is not None and stored != self.identity) or legacy:
            what = ("samples of unknown origin (a manifest.jsonl written before sample folders recorded "
                    "what made them)" if legacy else
                    "samples made differently (" + "; ".join(identity_differences(stored, self.identity)) + ")")
            if not overwrite:
                raise SampleFolderError(f"{self.folder} holds {what}: use another folder, or pass "
                                        f"{overwrite_flag} to discard them")
            n = self._clear()
            log.warning("%s: removed %d image(s) made differently (%s)", self.folder, n, overwrite_flag)
            stored = None
        if stored is None:
            write_text(self.folder / IDENTITY_FILE, json.dumps(
                {"format": FORMAT_VERSION, "identity": self.identity}, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, folder: str | os.PathLike) -> SampleFolder:
        """An existing sample folder with its own recorded identity (to read or score it); raises
        SampleFolderError when the folder records none."""
        identity = stored_identity(folder)
        if identity is None:
            raise SampleFolderError(f"{folder} is not a sample folder (no {IDENTITY_FILE})")
        return cls(folder, identity)

    def _record_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"{RECORDS_PREFIX}*.jsonl") if p.is_file())

    @staticmethod
    def _read_lines(path: Path, *, legacy: bool = False) -> list[dict]:
        """The readable lines of a records file; `legacy`: of an old manifest.jsonl (file and, for
        class samples, label instead of prompt)."""
        out = []
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if legacy:
                    rec = {"prompt": rec.get("prompt", rec.get("label")), "seed": rec["seed"], "file": rec["file"]}
                rec["prompt"], rec["seed"], rec["file"] = str(rec["prompt"]), int(rec["seed"]), str(rec["file"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("%s:%d: unreadable record line ignored (a write interrupted by a crash?)", path, n)
                continue
            out.append(rec)
        return out

    def _valid(self, rec: dict) -> bool:
        """The record's image is on disk with the bytes it recorded (size and mtime first, the hash
        only when they changed, so checking thousands of images stays cheap)."""
        path = self.folder / rec["file"]
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns"):
            return True
        try:
            return st.st_size == rec.get("size") and file_sha256(path) == rec.get("sha256")
        except OSError:
            return False

    def _all_records(self) -> dict[Key, dict]:
        """(prompt, seed) -> the last record whose image is valid, over every records file."""
        found: dict[Key, dict] = {}
        for path in self._record_files():
            for rec in self._read_lines(path):
                key = (str(rec["prompt"]), int(rec["seed"]))
                if self._valid(rec):
                    found[key] = rec
        return found

    def missing(self, keys: Iterable[Key]) -> list[Key]:
        """The keys (in the given order) with no valid image yet: never sampled, or whose image was
        deleted, truncated or changed since it was recorded."""
        have = self._all_records()
        return [(str(p), int(s)) for p, s in keys if (str(p), int(s)) not in have]

    def records(self, keys: Sequence[Key] | None = None) -> list[dict]:
        """One record per (prompt, seed) with a valid image: of `keys` (in their order, missing ones left
        out) or, with None, all of them sorted by (prompt, seed). Each has `prompt`, `seed`, `file`
        (relative), `path` (absolute Path) and the caller's extra fields."""
        have = self._all_records()
        chosen = ([have[(str(p), int(s))] for p, s in keys if (str(p), int(s)) in have] if keys is not None
                  else [have[k] for k in sorted(have)])
        return [{**rec, "path": self.folder / rec["file"]} for rec in chosen]

    # ------------------------------------------------------------------ writing
    def path_for(self, prompt: str, seed: int) -> Path:
        """Where the image of (prompt, seed) goes: <folder>/<prompt slug>-<hash>/<seed>.png."""
        return self.folder / _slug(prompt) / f"{int(seed):06d}.png"

    def add(self, prompt: str, seed: int, image: Image.Image, **extra: Any) -> Path:
        """Write the image atomically, then record it (with `extra` JSON fields). An image sampled
        again replaces its record: the records file is rewritten without the old line."""
        path = save_image(image.convert("RGB"), self.path_for(prompt, seed))
        st = path.stat()
        rec = {**extra, "prompt": str(prompt), "seed": int(seed), "file": path.relative_to(self.folder).as_posix(),
               "sha256": file_sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        key = (rec["prompt"], rec["seed"])
        if self._recorded_keys is None:
            self._recorded_keys = {(r["prompt"], r["seed"]) for p in self._record_files() for r in self._read_lines(p)}
        if key in self._recorded_keys:  # rare (a deleted or damaged image): rewrite without its old line
            for records_path in self._record_files():
                lines = self._read_lines(records_path)
                kept = [r for r in lines if (r["prompt"], r["seed"]) != key]
                if len(kept) != len(lines):
                    write_text(records_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._recorded_keys.add(key)
        with open(self._records_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return path

    def _clear(self) -> int:
        """Remove the images every records file (and a legacy manifest) names, the records and the
        identity; other files (e.g. a report folder) stay. Returns the number of images removed."""
        named: list[Path] = []
        lists = [*self._record_files(), self.folder / LEGACY_MANIFEST]
        for path in lists:
            if path.is_file():
                named += [self.folder / r["file"] for r in self._read_lines(path, legacy=path.name == LEGACY_MANIFEST)]
        root = self.folder.resolve()
        n = 0
        for p in dict.fromkeys(named):
            if root in p.resolve().parents and p.is_file():  # never outside the folder
                p.unlink()
                n += 1
                if p.parent != self.folder and not any(p.parent.iterdir()):
                    p.parent.rmdir()
        for path in (*lists, self.folder / IDENTITY_FILE):
            if path.is_file():
                path.unlink()
        return n

