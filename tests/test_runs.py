"""arbooth.runs on its own: the run-folder rule and the resume check (no model, milliseconds)."""
from __future__ import annotations

import pytest
import torch
import yaml

from arbooth.errors import CheckpointError, ConfigError
from arbooth.runs import (
    ResumeError,
    RunFolderError,
    check_resume,
    prepare_run_dir,
    resume_point,
    run_identity,
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
    (folder / "arbooth.yaml").write_text(yaml.safe_dump({"result": {"run": {"run_id": run_id}}}))
    torch.save({"step": step, "world_size": 1, "run": {**identity, "run_id": run_id, "record": {"run_id": run_id}},
                **extra}, folder / "train_state.pt")
    return folder


def test_resume_point_is_the_one_resume_check_of_both_class_recipes(tmp_path):
    ident = run_identity({"train": {"max_steps": 4}}, data_sha256="d", base_sha256="b")
    more = run_identity({"train": {"max_steps": 6}}, data_sha256="d", base_sha256="b")
    write_run_file(tmp_path, {"run_id": "r1"})
    with pytest.raises(RunFolderError, match="no checkpoint of it"):
        resume_point(tmp_path, "auto", identity=ident, safe=(), num_processes=1)
    _checkpoint(tmp_path, 2, "r1", ident)
    last = _checkpoint(tmp_path, 4, "r1", ident)
    _checkpoint(tmp_path, 6, "other", ident)  # another run's checkpoint is never picked by auto
    point = resume_point(tmp_path, "auto", identity=more, safe=("train.max_steps",), num_processes=1)
    assert (point.folder, point.step, point.changes) == (last, 4, {"train.max_steps": [4, 6]})
    assert point.record == {"run_id": "r1", "_changes": {"train.max_steps": [4, 6]}}
    with pytest.raises(ResumeError, match="train.max_steps: 4 -> 6"):
        resume_point(tmp_path, last, identity=more, safe=(), num_processes=1)
    with pytest.raises(CheckpointError, match=r"1 process\(es\).*now 2"):
        resume_point(tmp_path, last, identity=ident, safe=(), num_processes=2)
    with pytest.raises(ResumeError, match="belongs to run other"):
        resume_point(tmp_path, tmp_path / "checkpoints" / "step_00000006", identity=ident, safe=(),
                     num_processes=1)
    with pytest.raises(ResumeError, match="is not a DP checkpoint"):
        resume_point(tmp_path, last, identity=ident, safe=(), num_processes=1, weights_only=False,
                     require=("private", "is not a DP checkpoint"))
    with pytest.raises(CheckpointError, match="not a resumable checkpoint"):
        resume_point(tmp_path, tmp_path, identity=ident, safe=(), num_processes=1)
