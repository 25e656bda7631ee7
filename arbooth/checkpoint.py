"""Checkpoint I/O shared by every model family: read .pth/.safetensors, strict key checks with a
readable report, and atomic writes (arbooth/outputs.py: temp file + rename, so a crash never leaves
half a file)."""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from arbooth.errors import CheckpointError
from arbooth.outputs import atomic_write

# Official checkpoints sometimes wrap the weights; these are the wrapper keys we unwrap.
_WRAPPER_KEYS = ("model", "state_dict", "trainer", "gpt_wo_ddp", "module")


def read_state_dict(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a torch pickle (`.pth`, `.pt`, `.bin`), weights only."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a folder: {path}")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path), device=str(map_location))
        else:
            sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{path} holds no tensors (top-level keys: {list(sd)[:8]})")
        sd = inner
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path} is not a state dict (got {type(sd).__name__})")
    return dict(sd)


def state_dict_mismatch(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, torch.Tensor],
    *,
    ignore: Iterable[str] = (),
    limit: int = 8,
) -> str | None:
    """Compare key -> shape maps. Returns None when they match, else a report listing the first
    `limit` missing, unexpected and mis-shaped keys. Keys in `ignore` may be present or absent."""
    ignore = set(ignore)
    missing = [k for k in expected if k not in got and k not in ignore]
    unexpected = [k for k in got if k not in expected and k not in ignore]
    misshaped = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return None
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title}: " + ", ".join(items[:limit]) + more)
    return "\n".join(lines)


def safetensors_writer(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                       ) -> tuple[Callable[[str], object], int]:
    """(write(tmp_path), bytes of tensor data) for `atomic_write` / `atomic_write_many`."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return (lambda tmp: save_file(flat, tmp, metadata=dict(metadata or {}))), tensor_bytes(flat)


def torch_writer(obj: object) -> tuple[Callable[[str], object], int]:
    """(write(tmp_path), bytes of its tensors) of `torch.save(obj)`."""
    return (lambda tmp: torch.save(obj, tmp)), tensor_bytes(obj)


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensors in a (nested) dict/list/tuple: about what saving it needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Atomically save tensors (made contiguous, detached, on the CPU) as safetensors."""
    write, size = safetensors_writer(tensors, metadata)
    atomic_write(path, write, size=size)


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """Atomically `torch.save` an object (training state: optimizer, scheduler, RNG); a failed write
    (a full disk) is one OutputError line (arbooth/outputs.py)."""
    write, size = torch_writer(obj)
    atomic_write(path, write, size=size)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB chunks (base-model ids, shipped-asset checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file_hashes(folder: str | os.PathLike, sha256: dict[str, str], manifest_name: str) -> None:
    """Every file named in `sha256` (relative to `folder`) exists and has that hex SHA-256; raises
    CheckpointError naming the first that does not (shipped toy assets, manifests written by pretraining)."""
    for name, digest in sha256.items():
        path = Path(folder) / name
        if not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(f"{path} is missing or does not match the sha256 in {manifest_name}")


def partial_dir(folder: str | os.PathLike) -> Path:
    """A fresh, empty `.<name>.partial` folder beside `folder` to write a whole result or checkpoint into;
    `commit_dir` then moves it into place, so `folder` is always complete or absent."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def commit_dir(partial: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Replace `folder` (if any) by the finished `partial` (a rename on the same file system)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    Path(partial).rename(folder)



def commit_staged(stage: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move every entry of the finished staging folder `stage` (from `partial_dir`) into `out`, replacing
    entries of the same name, then remove `stage`. Renames need no space, so once the files that belong
    together are all written a full disk cannot leave some of them new and some old."""
    stage, out = Path(stage), Path(out)
    for entry in sorted(stage.iterdir()):
        target = out / entry.name
        if entry.is_dir():
            commit_dir(entry, target)
        else:
            os.replace(entry, target)
    stage.rmdir()
