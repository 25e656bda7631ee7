"""arbooth.runs on its own: the run-folder rule and the resume check (no model, milliseconds)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from arbooth.errors import CheckpointError, ConfigError
from arbooth.runs import (
    LOCK_FILE,
    ResumeError,
    RunFolderError,
    check_resume,
    hold_run_dir,
    latest_checkpoint,
    prepare_run_dir,
    prune_checkpoints,
    refuse_backwards,
    resume_point,
    run_checkpoints,
    run_identity,
    truncate_jsonl,
    write_run_file,
)

ENTRIES = ("config.yaml", "checkpoints", "final")


def test_prepare_run_dir(tmp_path):
    out = tmp_path / "x"
    assert prepare_run_dir(out, entries=ENTRIES, resume=False, overwrite=False) is False  # absent
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not the recipe's: the folder holds no run
    assert prepare_run_dir(out, entries=ENTRIES, resume=False, overwrite=False) is False
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "config.yaml").write_text("a: 1")
    with pytest.raises(RunFolderError, match=r"holds a run \(config.yaml, checkpoints/\); pass --resume auto"):
        prepare_run_dir(out, entries=ENTRIES, resume=False, overwrite=False)
    assert prepare_run_dir(out, entries=ENTRIES, resume=True, overwrite=False) is True
    with pytest.raises(ConfigError, match="not both"):
        prepare_run_dir(out, entries=ENTRIES, resume=True, overwrite=True)
    assert prepare_run_dir(out, entries=ENTRIES, resume=False, overwrite=True) is False
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the recipe's entries went


def test_check_resume_names_unsafe_keys_and_returns_safe_changes():
    old = run_identity({"optim": {"lr": 0.01}, "train": {"max_steps": 4, "batch_size": 4}, "log": {"every": 1}},
                       data_sha256="d", base_sha256="b")
    new = run_identity({"optim": {"lr": 0.01}, "train": {"max_steps": 6, "batch_size": 4}, "log": {"every": 5}},
                       data_sha256="d", base_sha256="b")
    safe = ("train.max_steps", "log.")
    assert check_resume(old, new, safe=safe, where="ck") == {"log.every": [1, 5], "train.max_steps": [4, 6]}
    bad = run_identity({"optim": {"lr": 0.5}, "train": {"max_steps": 4, "batch_size": 8}, "log": {"every": 1}},
                       data_sha256="e", base_sha256="b")
    with pytest.raises(ResumeError, match=r"optim.lr: 0.01 -> 0.5; train.batch_size: 4 -> 8; data d -> e"):
        check_resume(old, bad, safe=safe, where="ck")
    with pytest.raises(ResumeError, match="records no config"):
        check_resume({}, new, safe=safe, where="ck")


def _checkpoint(out, step, run_id, identity, **extra):
    folder = out / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "arbooth.yaml").write_text(yaml.safe_dump({"result": {"step": step, "run": {"run_id": run_id}}}))
    torch.save({"step": step, "world_size": 1, "run": {**identity, "run_id": run_id, "record": {"run_id": run_id}},
                **extra}, folder / "train_state.pt")
    return folder


def test_resume_point_is_the_one_resume_check_of_both_class_recipes(tmp_path):
    ident = run_identity({"train": {"max_steps": 4}}, data_sha256="d", base_sha256="b")
    more = run_identity({"train": {"max_steps": 6}}, data_sha256="d", base_sha256="b")
    write_run_file(tmp_path, {"run_id": "r1"})
    with pytest.raises(RunFolderError, match="no checkpoint of it"):
        resume_point(tmp_path, "auto", identity=ident, safe=(), num_processes=1, end_step=6)
    _checkpoint(tmp_path, 2, "r1", ident)
    last = _checkpoint(tmp_path, 4, "r1", ident)
    _checkpoint(tmp_path, 6, "other", ident)  # another run's checkpoint is never picked by auto
    point = resume_point(tmp_path, "auto", identity=more, safe=("train.max_steps",), num_processes=1, end_step=6)
    assert (point.folder, point.step, point.changes) == (last, 4, {"train.max_steps": [4, 6]})
    assert point.record == {"run_id": "r1", "_changes": {"train.max_steps": [4, 6]}}
    with pytest.raises(ResumeError, match="train.max_steps: 4 -> 6"):
        resume_point(tmp_path, last, identity=more, safe=(), num_processes=1, end_step=6)
    with pytest.raises(CheckpointError, match=r"1 process\(es\).*now 2"):
        resume_point(tmp_path, last, identity=ident, safe=(), num_processes=2, end_step=6)
    with pytest.raises(ResumeError, match="belongs to run other"):
        resume_point(tmp_path, tmp_path / "checkpoints" / "step_00000006", identity=ident, safe=(),
                     num_processes=1, end_step=6)
    with pytest.raises(ResumeError, match="is not a DP checkpoint"):
        resume_point(tmp_path, last, identity=ident, safe=(), num_processes=1, end_step=6, weights_only=False,
                     require=("private", "is not a DP checkpoint"))
    with pytest.raises(CheckpointError, match="not a resumable checkpoint"):
        resume_point(tmp_path, tmp_path, identity=ident, safe=(), num_processes=1, end_step=6)



# ------------------------------------------------------------------ issue 28
def test_a_resume_never_moves_a_run_backwards(tmp_path):
    """Kind 1 (both class recipes go through resume_point; train-subject through refuse_backwards)."""
    ident = run_identity({"train": {"max_steps": 6}}, data_sha256="d", base_sha256="b")
    fewer = run_identity({"train": {"max_steps": 3}}, data_sha256="d", base_sha256="b")
    write_run_file(tmp_path, {"run_id": "r1"})
    _checkpoint(tmp_path, 6, "r1", ident)
    with pytest.raises(ResumeError, match="already reached step 6, and a resume never moves a run backwards"):
        resume_point(tmp_path, "auto", identity=fewer, safe=("train.max_steps",), num_processes=1, end_step=3)
    assert resume_point(tmp_path, "auto", identity=ident, safe=(), num_processes=1, end_step=6).step == 6
    with pytest.raises(ResumeError, match="at least 6 steps"):
        refuse_backwards(6, 5, where="x", steps_key="steps=")


def test_checkpoints_are_found_and_pruned_by_recorded_run_id_and_step_number(tmp_path):
    """Kind 4: a user's copy `step_best` (same run id, same arbooth.yaml) is not the newest checkpoint, and
    pruning never deletes `step_00000003_good`; the order is by number, not by name."""
    ident = run_identity({"train": {"max_steps": 6}}, data_sha256="d", base_sha256="b")
    root = tmp_path / "checkpoints"
    for step in (3, 6, 10):
        _checkpoint(tmp_path, step, "r1", ident)
    for copy in ("step_best", "step_00000003_good", "step_99999999"):  # user copies of step 3
        shutil.copytree(root / "step_00000003", root / copy)
    _checkpoint(tmp_path, 7, "other", ident)
    assert [s for s, _ in run_checkpoints(root, "r1")] == [3, 6, 10]
    assert latest_checkpoint(root, "r1") == root / "step_00000010"
    assert latest_checkpoint(root, None) == root / "step_00000010"  # any run: still by number
    prune_checkpoints(root, 1, "r1")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003_good", "step_00000007", "step_00000010",
                                                      "step_99999999", "step_best"]


def test_truncate_jsonl_cuts_a_log_back_to_a_step(tmp_path):
    """Kind 2: the helper every per-step log goes through on resume (a torn last line is dropped too)."""
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": i / 10}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo')
    assert truncate_jsonl(log, 3) == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    assert truncate_jsonl(tmp_path / "absent.jsonl", 3) == 0 and not (tmp_path / "absent.jsonl").exists()


def test_a_run_folder_lock_refuses_a_second_run_and_is_not_left_stuck(tmp_path):
    """Kind 5: O_EXCL lock with pid + host; a dead pid on this host is stale; released on error too."""
    out = tmp_path / "run"
    with hold_run_dir(out, "train-class") as lock:
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(RunFolderError, match=r"in use by another run \(train-class, pid"), \
                hold_run_dir(out, "train-class"):
            pass
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(ValueError), hold_run_dir(out, "x"):
        raise ValueError("a crash inside the run")
    assert not (out / LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with hold_run_dir(out, "x"):  # a crashed run's lock is taken over
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "command": "y"}))
    with pytest.raises(RunFolderError, match="on host elsewhere.*delete"), hold_run_dir(out, "x"):
        pass
    with hold_run_dir(out, "x", enabled=False) as none:  # the other ranks of a distributed run
        assert none is None


def test_a_resume_with_only_the_base_model_changed_is_refused():
    """Mutant caught (issue 28): the base hash left out of the resume check (config and data unchanged)."""
    cfg = {"train": {"max_steps": 4}}
    old = run_identity(cfg, data_sha256="d", base_sha256="base-A")
    with pytest.raises(ResumeError, match="base base-A -> base-B"):
        check_resume(old, run_identity(cfg, data_sha256="d", base_sha256="base-B"), safe=(), where="ck")
    assert check_resume(old, run_identity(cfg, data_sha256="d", base_sha256="base-A"), safe=(), where="ck") == {}


def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="cannot create the run folder"), hold_run_dir(tmp_path / "file" / "x", "x"):
        pass
