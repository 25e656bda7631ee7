"""Run folders and resume checks shared by every training recipe: runs never mix, resumes never lie.

A run folder (`train.out_dir`, `out_dir`, ...) holds ONE run. Its marker is `run.json` (run id, command,
creation time, and one entry per session: the steps it ran and the config changes it applied). The rules:

- A fresh run needs a folder that is absent, empty, or holds none of the recipe's own entries
  (`config.yaml`, `checkpoints/`, `final/`, logs ...). Files that are not the recipe's are left alone.
- A folder that holds a run is refused with one line, unless the user says `resume` (continue that run
  from its checkpoint) or `overwrite` (delete the recipe's entries, start a new run with fresh logs).
- Checkpoints carry the run id and their step: a recipe finds, prunes and resumes only the checkpoints
  its run wrote (`step_<8 digits>/` whose arbooth.yaml records this run id and that step), newest by number;
  a user's copy (`step_best`, `step_00000003_good`) is never taken or deleted.
- A run holds its folder (`hold_run_dir`: an O_EXCL lock file with pid, host and command): a second run
  into it is refused with one line; a lock left by a crashed run on this host is taken over.
- A resume never moves a run backwards (`refuse_backwards`); per-step logs are cut back to the resumed
  step (`truncate_jsonl`), so no step is logged twice.
- The training state records the resolved config (its values and SHA-256) and the data's identity. A
  resume compares them with the new config: a key outside the recipe's documented safe set that differs
  is refused, naming the keys; safe changes (more steps, checkpoint/log cadence, moved paths whose
  content hash is unchanged) are applied and recorded in `run.json` and the checkpoint.

Imports only torch/numpy/yaml and `arbooth.config`/`outputs`/`errors`: this module sits in the bottom layer, with
`checkpoint`, so that every recipe can share it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from arbooth.config import to_dict
from arbooth.errors import ArboothError, CheckpointError, ConfigError
from arbooth.outputs import write_text

RUN_FILE = "run.json"
LOCK_FILE = ".arbooth.lock"
# The name of a checkpoint folder a recipe writes: step_ and exactly eight digits (`step_00000100`).
CHECKPOINT_NAME = re.compile(r"step_(\d{8})")


class RunFolderError(ArboothError):
    """The output folder holds another run, and neither resume nor overwrite was asked for."""


class ResumeError(ArboothError):
    """A resume would not continue the same run (config, data or base model changed)."""


# ------------------------------------------------------------------ run folders
def run_entries_present(out: Path, entries: Iterable[str]) -> list[str]:
    """The recipe's entries (plus run.json) that exist in `out`, folders with a trailing slash."""
    out = Path(out)
    found = []
    for name in (RUN_FILE, *entries):
        p = out / name
        if p.exists():
            found.append(name + "/" if p.is_dir() else name)
    return found


def prepare_run_dir(out: str | Path, *, entries: Sequence[str], resume: bool, overwrite: bool,
                    resume_flag: str = "--resume auto", overwrite_flag: str = "--overwrite",
                    delete: bool = True) -> bool:
    """Check (and with `overwrite`, clear) a run folder before a run starts. Returns True when the
    folder holds a run (so a resume has something to continue).

    Raises RunFolderError when the folder holds a run and neither flag is set; ConfigError when both
    are. With `overwrite`, the recipe's `entries` and run.json are deleted (when `delete`: set it on
    one process only), other files are kept. The flag names go into the message so that it names
    the command's own options.
    """
    if resume and overwrite:
        raise ConfigError(f"pass either {resume_flag} or {overwrite_flag}, not both")
    out = Path(out)
    found = run_entries_present(out, entries)
    if not found:
        return False
    if overwrite:
        if delete:
            for name in found:
                p = out / name.rstrip("/")
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return False
    if not resume:
        raise RunFolderError(f"{out} already holds a run ({', '.join(found[:4])}); pass {resume_flag} to "
                             f"continue it or {overwrite_flag} to replace it (or choose another folder)")
    return True


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def read_run_file(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}); delete it or use another folder") from e


def write_run_file(out: str | Path, record: Mapping[str, Any]) -> None:
    """Atomically write run.json (a crash leaves the old file or the new one)."""
    write_text(Path(out) / RUN_FILE, json.dumps(record, indent=1, default=str) + "\n")


def new_run_record(command: str, run_id: str | None = None) -> dict[str, Any]:
    return {"run_id": run_id or new_run_id(), "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sessions": []}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def hold_run_dir(out: str | Path, command: str, *, enabled: bool = True) -> Iterator[Path | None]:
    """Hold run folder `out` for the duration of the block: `out/.arbooth.lock` is created with O_EXCL and
    holds {pid, host, command, started}; it is removed on leaving (also on an error). Yields the lock path.

    Raises RunFolderError (one line) while another live run holds the folder. A lock whose process is gone
    (same host, dead pid) was left by a crash and is taken over with a note in the log; a lock of another
    host cannot be checked, so the message names the file to delete. `enabled=False` (the other processes
    of a distributed run): nothing is locked."""
    if not enabled:
        yield None
        return
    lock = Path(out) / LOCK_FILE
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only parent
        raise RunFolderError(f"cannot create the run folder {out}: {e.strerror or e}") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                held = {}
            if not held and time.time() - _mtime(lock) < 10:  # being written by a run starting now
                time.sleep(0.5)
                continue
            stale = not held or (held.get("host") == me["host"] and not _pid_alive(int(held.get("pid", -1))))
            if not stale:
                where = "" if held.get("host") == me["host"] else f" on host {held.get('host')}"
                raise RunFolderError(
                    f"{out} is in use by another run ({held.get('command', '?')}, pid {held.get('pid')}{where}, "
                    f"since {held.get('started', '?')}); wait for it to end, use another folder, or delete "
                    f"{lock} if that run is gone") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunFolderError(f"cannot lock {out}: {lock} keeps appearing; another run is starting there")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def refuse_backwards(saved_step: int, end_step: int, *, where: str, steps_key: str) -> None:
    """A resume continues a run forwards only: ResumeError (one line) when the run already reached
    `saved_step` and the resumed config ends at `end_step` < saved_step (the weights would be relabelled
    with a smaller step, and a later resume would train the difference again)."""
    if end_step < saved_step:
        raise ResumeError(f"cannot resume {where} to {end_step} steps: it already reached step {saved_step}, "
                          f"and a resume never moves a run backwards; ask for at least {saved_step} steps "
                          f"({steps_key}), or use the checkpoint of an earlier step")


def truncate_jsonl(path: str | Path, step: int, *, key: str = "step") -> int:
    """Cut a per-step JSONL log back to the lines with `key` <= `step` (a resumed run logs the steps after
    `step` again); a torn last line (a crash mid-write) is dropped too. Atomic; returns the lines kept.
    A missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, Mapping) and isinstance(row.get(key), int) and row[key] <= step:
            kept.append(line)
    write_text(path, "".join(x + "\n" for x in kept))
    return len(kept)


# ------------------------------------------------------------------ identity of a config, data, files
def flat_config(cfg: Any) -> dict[str, Any]:
    """A config as dotted keys -> plain values (`{"optim.lr": 0.01, ...}`)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        else:
            out[prefix.rstrip(".")] = v
    walk("", to_dict(cfg) if not isinstance(cfg, Mapping) else cfg)
    return out


def values_sha256(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(values), sort_keys=True, default=str).encode()).hexdigest()


def run_identity(cfg: Any, *, data_sha256: str | None, base_sha256: str | None) -> dict[str, Any]:
    """What a training state records so that a resume can check it continues the same run."""
    values = flat_config(cfg)
    return {"config": values, "config_sha256": values_sha256(values), "data_sha256": data_sha256,
            "base_sha256": base_sha256}


def _is_safe(key: str, safe: Collection[str]) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in safe)


def check_resume(saved: Mapping[str, Any], now: Mapping[str, Any], *, safe: Collection[str],
                 where: str) -> dict[str, list[Any]]:
    """Compare a saved `run_identity` with the current one.

    Returns the safe changes `{key: [old, new]}` (to record). Raises ResumeError naming every unsafe
    key that differs, or a changed data set or base model. `safe` holds keys, or prefixes ending in '.'.
    """
    if "config" not in saved:
        raise ResumeError(f"{where} records no config (written by an older arbooth): it cannot be checked, "
                          "so it is not resumed; start a new run")
    old, new = saved["config"], now["config"]
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    unsafe = {k: v for k, v in changed.items() if not _is_safe(k, safe)}
    problems = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items()]
    for what in ("data", "base"):
        a, b = saved.get(f"{what}_sha256"), now.get(f"{what}_sha256")
        if a != b:
            problems.append(f"{what} {str(a)[:12]} -> {str(b)[:12]}")
    if problems:
        more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ResumeError(f"cannot resume {where}: it was written with a different setup ("
                          + "; ".join(problems[:6]) + more + "); resume with the same config, or pass "
                          "--overwrite / another folder to start a new run")
    return {k: v for k, v in changed.items()}


def start_session(record: dict[str, Any], *, start_step: int, changes: Mapping[str, Any],
                  config_sha256: str) -> dict[str, Any]:
    """Append a session (a stretch of training between a start or resume and a stop) to a run record."""
    session = {"start_step": int(start_step), "end_step": None, "config_sha256": config_sha256,
               "changes": dict(changes),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record.setdefault("sessions", []).append(session)
    return session


# ------------------------------------------------------------------ checkpoints of a run
def checkpoint_run_id(folder: Path) -> str | None:
    """The run id a result/checkpoint folder records in arbooth.yaml (`result.run.run_id`), if any."""
    return _checkpoint_record(folder).get("run", {}).get("run_id")


def _checkpoint_record(folder: Path) -> dict[str, Any]:
    """`result` of a checkpoint's arbooth.yaml ({} when missing or unreadable)."""
    meta = Path(folder) / "arbooth.yaml"
    try:
        result = (yaml.safe_load(meta.read_text()) or {}).get("result") if meta.is_file() else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return {}
    if not isinstance(result, Mapping):
        return {}
    return {**result, "run": result.get("run") if isinstance(result.get("run"), Mapping) else {}}


def run_checkpoints(root: Path, run_id: str | None) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints under `root` that a run wrote, oldest first by step NUMBER: named
    `step_<8 digits>`, their arbooth.yaml records that step and `run_id` (any run id when None). Anything
    else there (a user's `step_best` copy, `step_00000003_good`, another run's) is not a checkpoint of it."""
    root = Path(root)
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = CHECKPOINT_NAME.fullmatch(p.name)
        if not (m and p.is_dir()):
            continue
        rec = _checkpoint_record(p)
        if rec.get("step") == int(m.group(1)) and (run_id is None or rec["run"].get("run_id") == run_id):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path, run_id: str | None) -> Path | None:
    """The checkpoint of `run_id` under `root` with the largest step (`run_checkpoints`)."""
    mine = run_checkpoints(root, run_id)
    return mine[-1][1] if mine else None


def prune_checkpoints(root: Path, keep: int, run_id: str) -> None:
    """Delete all but the newest `keep` checkpoints OF THIS RUN (`run_checkpoints`; nothing else is ever
    touched); 0 keeps all. Call it on one process."""
    if keep > 0:
        for _, old in run_checkpoints(root, run_id)[:-keep]:
            shutil.rmtree(old)


@dataclass(frozen=True)
class ResumePoint:
    """A checked checkpoint to continue: its folder, its train_state.pt, the safe config changes, and the
    run record to carry on (`_changes` holds the changes for the next session)."""
    folder: Path
    state: dict
    changes: dict[str, list[Any]]
    record: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def resume_point(out: str | Path, resume: str | Path, *, identity: Mapping[str, Any], safe: Collection[str],
                 num_processes: int, end_step: int, weights_only: bool = True,
                 require: tuple[str, str] | None = None) -> ResumePoint:
    """Find and check the checkpoint a class recipe resumes from; restoring it is the recipe's.

    `resume` is a checkpoint folder or "auto" (the newest checkpoint of the run in `out`). The checkpoint
    must belong to the run that `out` holds, compare equal to `identity` up to the `safe` keys
    (`check_resume`), come from `num_processes` processes (the data order depends on it) and be at most at
    `end_step`, the step the resumed config ends at (`refuse_backwards`).
    `weights_only=False` only for a recipe's own train_state.pt whose state is not plain tensors (the DP
    accountant). `require=(key, message)`: a key train_state.pt must hold, else ResumeError(f"{folder}
    {message}"). Raises RunFolderError, CheckpointError, ResumeError (one line each).
    """
    out = Path(out)
    current = read_run_file(out)
    if str(resume) == "auto":
        folder = latest_checkpoint(out / "checkpoints", current["run_id"] if current else None)
        if folder is None:
            raise RunFolderError(f"{out} holds a run but no checkpoint of it to resume; pass --overwrite to "
                                 "start a new run there")
    else:
        folder = Path(resume)
    state_path = folder / "train_state.pt"
    if not state_path.is_file():
        raise CheckpointError(f"{folder} has no train_state.pt: not a resumable checkpoint")
    state = torch.load(state_path, map_location="cpu", weights_only=weights_only)
    saved = state.get("run", {})
    if current is not None and saved.get("run_id") != current["run_id"]:
        raise ResumeError(f"{folder} belongs to run {saved.get('run_id')}, but {out} holds run "
                          f"{current['run_id']}; resume into that run's own folder")
    if require is not None and require[0] not in state:
        raise ResumeError(f"{folder} {require[1]}")
    changes = check_resume(saved, identity, safe=safe, where=str(folder))
    if state["world_size"] != num_processes:
        raise CheckpointError(f"{folder} was written by {state['world_size']} process(es); resume it with the "
                              f"same number (now {num_processes}) so the data order stays the same")
    refuse_backwards(int(state["step"]), end_step, where=str(folder),
                     steps_key="train.max_steps / train.epochs")
    return ResumePoint(folder=folder, state=state, changes=changes, record={**saved["record"], "_changes": changes})


def get_rng_state() -> dict:
    """The global RNGs a training step may draw from (dropout, DropPath): torch CPU and CUDA, numpy, random,
    in types `torch.load(weights_only=True)` reads back (numpy's key array travels as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
