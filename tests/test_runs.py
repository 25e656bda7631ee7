"""arbooth.runs on its own: the run-folder rule and the resume check (no model, milliseconds)."""
from __future__ import annotations

import pytest

from arbooth.errors import ConfigError
from arbooth.runs import ResumeError, RunFolderError, check_resume, prepare_run_dir, run_identity

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
