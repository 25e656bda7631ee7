"""Runs never mix, resumes never lie (issue 18, cases 1, 2, 2b, 8, 9) on the tiny class config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _class_tiny import tiny_config, write_dataset
from PIL import Image

from arbooth.adapt.finetuned import build_vae_var, load_finetuned
from arbooth.checkpoint import save_torch
from arbooth.cli import main as cli
from arbooth.config import save_config
from arbooth.data.class_dataset import scan_image_folder
from arbooth.errors import CheckpointError, ConfigError
from arbooth.models import official_state_dict
from arbooth.recipes.train_class import train
from arbooth.runs import ResumeError, RunFolderError


@pytest.fixture
def data_root(tmp_path):
    return write_dataset(tmp_path / "data")


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_case1_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(data_root, tmp_path):
    out = tmp_path / "x"
    first = train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 2}))
    first_id = json.loads((out / "run.json").read_text())["run_id"]
    second = tiny_config(data_root, out, train={"max_steps": 2, "checkpoint_every": 1}, optim={"lr": 0.01})
    with pytest.raises(RunFolderError, match="already holds a run .*--resume auto.*--overwrite"):
        train(second)
    # refused before anything was written: the first run is intact
    assert _steps(out) == ["step_00000002", "step_00000004"]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    # overwrite: a new run with its own id; none of the first run's checkpoints or results remain
    run = train(second, overwrite=True)
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] != first_id and [s["end_step"] for s in record["sessions"]] == [2]
    assert _steps(out) == ["step_00000001", "step_00000002"] and len(run.history) == 2
    meta = yaml.safe_load((out / "final" / "arbooth.yaml").read_text())
    assert meta["optim"]["lr"] == 0.01 and meta["result"]["run"]["run_id"] == record["run_id"]
    assert len(first.history) == 4


def test_case1_cli_one_line_refusal(data_root, tmp_path, capsys):
    save_config(tiny_config(data_root, tmp_path / "x", train={"max_steps": 1}), tmp_path / "tiny.yaml")
    assert cli(["train-class", "--config", str(tmp_path / "tiny.yaml")]) == 0
    capsys.readouterr()
    assert cli(["train-class", "--config", str(tmp_path / "tiny.yaml"), "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0]
    assert cli(["train-class", "--config", str(tmp_path / "tiny.yaml"), "--resume", "auto", "--overwrite"]) == 2


def test_pruning_and_resume_never_touch_another_runs_checkpoints(data_root, tmp_path):
    other = tmp_path / "other"
    train(tiny_config(data_root, other, train={"max_steps": 1}))
    out = tmp_path / "x"
    train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 2}), stop_at=2)
    foreign = out / "checkpoints" / "step_00000099"  # another run's checkpoint, copied in by hand
    (other / "checkpoints" / "step_00000001").rename(foreign)
    run = train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 1}),
                resume="auto")
    assert len(run.history) == 2  # resumed its own step 2, not the foreign "step 99"
    assert _steps(out) == ["step_00000004", "step_00000099"]  # pruned its own only


def test_case2_resume_refuses_a_changed_config_and_records_safe_changes(data_root, tmp_path):
    out = tmp_path / "x"
    train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 2}))
    changed = tiny_config(data_root, out, train={"max_steps": 4, "batch_size": 8, "checkpoint_every": 2},
                          optim={"lr": 0.5})
    with pytest.raises(ResumeError, match=r"optim.lr: 0.003 -> 0.5; train.batch_size: 4 -> 8"):
        train(changed, resume="auto")
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 3e-3  # not rewritten
    # another data set (one image less) is refused too
    (data_root / "class_0" / "0.png").unlink()
    with pytest.raises(ResumeError, match="data"):
        train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 2}), resume="auto")
    write_dataset(data_root)  # the same images again
    more = tiny_config(data_root, out, train={"max_steps": 6, "checkpoint_every": 3})
    run = train(more, resume="auto")
    assert len(run.history) == 2  # steps 5 and 6
    record = json.loads((out / "run.json").read_text())
    assert [(s["start_step"], s["end_step"]) for s in record["sessions"]] == [(0, 4), (4, 6)]
    assert record["sessions"][1]["changes"] == {"train.checkpoint_every": [2, 3], "train.max_steps": [4, 6]}
    meta = yaml.safe_load((out / "final" / "arbooth.yaml").read_text())
    assert meta["train"]["max_steps"] == 6 and meta["result"]["run"]["sessions"][1]["changes"]


def test_case2b_mid_epoch_resume_with_lora_dropout_is_exact(data_root, tmp_path):
    # 16 images, batch 4: 4 steps per epoch; stop at step 2 (mid-epoch) and resume
    from dataclasses import replace

    def cfg_at(out):
        cfg = tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 2}, optim={"lr": 1e-2})
        return replace(cfg, method=replace(cfg.method, lora_dropout=0.1))
    full = train(cfg_at(tmp_path / "full"))
    cfg = cfg_at(tmp_path / "split")
    first = train(cfg, stop_at=2)
    second = train(cfg, resume="auto")
    assert [h["loss"] for h in first.history + second.history] == [h["loss"] for h in full.history]
    a = dict(full.accelerator.unwrap_model(full.model).named_parameters())
    for n, p in second.accelerator.unwrap_model(second.model).named_parameters():
        assert torch.equal(p, a[n]), n


def _bases(cfg, tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        vae, var = build_vae_var(cfg.model)
        save_torch(official_state_dict(vae), tmp_path / f"vae_{name}.pth")
        save_torch(official_state_dict(var, include_buffers=True), tmp_path / f"var_{name}.pth")
        paths[name] = tmp_path / f"var_{name}.pth"
    return paths


def test_case8_a_result_refuses_another_base(data_root, tmp_path, capsys):
    cfg = tiny_config(data_root, tmp_path / "loraA", train={"max_steps": 1})
    bases = _bases(cfg, tmp_path)
    from dataclasses import replace
    cfg = replace(cfg, model=replace(cfg.model, vae_ckpt=str(tmp_path / "vae_A.pth"), var_ckpt=str(bases["A"])))
    train(cfg)
    final = tmp_path / "loraA" / "final"
    base = yaml.safe_load((final / "arbooth.yaml").read_text())["result"]["base"]
    assert len(base["var_sha256"]) == 64 and len(base["vae_sha256"]) == 64
    load_finetuned(final)  # its own base: fine
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=base["var_sha256"][:16]):
        load_finetuned(final, var_ckpt=str(bases["B"]))
    for cmd in (["sample", "--result", str(final), "--var-ckpt", str(bases["B"]), "--out", str(tmp_path / "g.png")],
                ["export", str(final), "--merge", "--var-ckpt", str(bases["B"]), "--out", str(tmp_path / "m.pth")]):
        assert cli(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "trained on a base var" in err[0] and base["var_sha256"][:16] in err[0]
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "m.pth").exists()


def test_case9_one_recursive_rule_for_class_folders_by_name(tmp_path):
    write_dataset(tmp_path / "d", classes=2, per_class=2)
    sub = tmp_path / "d" / "class_2" / "sub"
    sub.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (12, 12), (i, 0, 0)).save(sub / f"{i}.png")
    (tmp_path / "d" / "class_2" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "d" / "class_2" / ".ipynb_checkpoints" / "x.png")
    samples, classes = scan_image_folder(tmp_path / "d")
    assert classes == ["class_0", "class_1", "class_2"]
    assert sum(s.label == 2 for s in samples) == 3  # the subfolder counts; the hidden one does not

    from arbooth.commands.eval_class import class_counts
    assert class_counts(tmp_path / "d") == {"class_0": 2, "class_1": 2, "class_2": 3}  # same rule, by name
    (tmp_path / "d" / "class_3").mkdir()
    with pytest.raises(ConfigError, match="without any image file.*class_3"):
        scan_image_folder(tmp_path / "d")


# ------------------------------------------------------------------ issue 28 on train-class
def test_a_resume_below_the_reached_step_is_refused_and_changes_nothing(data_root, tmp_path):
    """Kind 1: max_steps 4, then a resume to 2 relabelled the step-4 weights 'step 2' in final/."""
    out = tmp_path / "x"
    train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 2}))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ResumeError, match="already reached step 4.*never moves a run backwards"):
        train(tiny_config(data_root, out, train={"max_steps": 2, "checkpoint_every": 2}), resume="auto")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_users_copy_of_a_checkpoint_is_neither_resumed_nor_pruned(data_root, tmp_path):
    """Kind 4: `step_best` sorted after `step_00000002` as text and was resumed (and then overwritten);
    pruning deleted `step_00000001_good`."""
    import shutil

    out = tmp_path / "x"
    train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 1}), stop_at=2)
    ck = out / "checkpoints"
    shutil.copytree(ck / "step_00000001", ck / "step_best")
    shutil.copytree(ck / "step_00000001", ck / "step_00000001_good")
    run = train(tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 1}),
                resume="auto")
    assert len(run.history) == 2  # resumed step 2 (not the copy of step 1)
    assert _steps(out) == ["step_00000001_good", "step_00000004", "step_best"]


def test_a_second_run_into_a_held_folder_is_refused_in_one_line(data_root, tmp_path, capsys):
    """Kind 5: two runs started together into one folder both 'succeeded'; the second is refused while the
    first holds the folder (here: this process holds it, as a run does while it trains)."""
    from arbooth.runs import hold_run_dir

    save_config(tiny_config(data_root, tmp_path / "twin", train={"max_steps": 1}), tmp_path / "tiny.yaml")
    with hold_run_dir(tmp_path / "twin", "train-class"):
        assert cli(["train-class", "--config", str(tmp_path / "tiny.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another run" in err[0]
        assert not (tmp_path / "twin" / "checkpoints").exists()
    assert cli(["train-class", "--config", str(tmp_path / "tiny.yaml")]) == 0
    assert not (tmp_path / "twin" / ".arbooth.lock").exists()


def test_tensorboard_steps_after_the_resumed_one_are_not_logged_twice(data_root, tmp_path):
    """Kind 2 on train-class: a run interrupted after logging step 3 (last checkpoint at 2) and resumed logs
    steps 3 and 4 again; metrics.jsonl is cut back and TensorBoard purges the first session's events after
    step 2 (purge_step), so each step is there once."""
    import shutil

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "x"
    cfg = tiny_config(data_root, out, train={"max_steps": 4, "checkpoint_every": 2}, log={"report_to": "tensorboard"})
    train(cfg, stop_at=3)
    shutil.rmtree(out / "checkpoints" / "step_00000003")  # the crash came before step 3 was saved
    train(cfg, resume="auto")
    events = EventAccumulator(str(out / "tensorboard" / "train-class"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
