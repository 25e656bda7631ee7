"""Experiment trackers for every trainer, through accelerate's tracker API, and the per-step JSONL log.

`log.report_to` (none | tensorboard | wandb | all) becomes `Accelerator(log_with=...)`, as diffusers'
training scripts' `--report_to` does; `open_trackers` starts them with the resolved config as
hyper-parameters (`accelerator.init_trackers`), `log_step` sends a step's scalars to them and appends
the same row to `metrics.jsonl` in the run folder (always, whatever `report_to` says), `log_grid` sends
a sample/validation grid as an image. TensorBoard writes under `<run folder>/tensorboard/<trainer>/`, W&B under
`<run folder>/wandb/` (offline when `WANDB_MODE=offline`). Everything here acts on the main process only.

`check_report_to` runs before a trainer writes anything: a tracker whose package is missing is one
ConfigError line, not a failure after the run folder exists.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arbooth.errors import ConfigError
from arbooth.runs import truncate_jsonl

REPORT_TO = ("none", "tensorboard", "wandb", "all")
JSONL_FILE = "metrics.jsonl"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def trackers(report_to: str) -> list[str]:
    """The accelerate tracker names `report_to` means ([] for none)."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"log.report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    return list(_PACKAGES) if report_to == "all" else [] if report_to == "none" else [report_to]


def check_report_to(report_to: str) -> list[str]:
    """`trackers(report_to)`, or ConfigError naming the missing package (call before writing anything)."""
    names = trackers(report_to)
    missing = [_PACKAGES[n] for n in names if importlib.util.find_spec(_PACKAGES[n]) is None]
    if missing:
        raise ConfigError(f"log.report_to={report_to} needs the {' and '.join(missing)} package "
                          f"(pip install {' '.join(missing)}), or set log.report_to=none")
    return names


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config dict as dotted keys with values TensorBoard's hparams take (lists and None as text)."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out |= flat_hparams(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def open_trackers(accelerator, project: str, config: Mapping[str, Any], out_dir: str | Path, *,
                  resume_step: int = 0) -> None:
    """Start the accelerator's trackers (those of its `log_with`) with `config` as hyper-parameters.
    `resume_step` > 0 (a resumed run): the rows logged after that step by an earlier session are dropped,
    since the steps are logged again (metrics.jsonl cut back with `runs.truncate_jsonl`, TensorBoard's
    events after it purged with `purge_step`), so every step appears once."""
    if resume_step and accelerator.is_main_process:
        truncate_jsonl(Path(out_dir) / JSONL_FILE, resume_step)
    if not accelerator.log_with:
        return
    names = [getattr(t, "value", t) for t in accelerator.log_with]
    kwargs: dict[str, dict] = {"wandb": {"dir": str(out_dir)}} if "wandb" in names else {}
    if resume_step and "tensorboard" in names:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    accelerator.init_trackers(project, config=flat_hparams(config), init_kwargs=kwargs)


def log_step(accelerator, out_dir: str | Path, row: Mapping[str, Any], step: int) -> None:
    """One step's values: to the trackers (numbers only; a list such as per-scale accuracy becomes
    `name/0`, `name/1`, ...) and, as one JSON line, to out_dir/metrics.jsonl."""
    if not accelerator.is_main_process:
        return
    scalars: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, (list, tuple)):
            scalars |= {f"{k}/{i}": float(x) for i, x in enumerate(v)}
        elif isinstance(v, (int, float)) and k != "step":
            scalars[k] = float(v)
    if accelerator.log_with:
        accelerator.log(scalars, step=step)
    with open(Path(out_dir) / JSONL_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **{k: v for k, v in row.items() if k != "step"}}) + "\n")


def log_grid(accelerator, tag: str, image_path: str | Path, step: int) -> None:
    """A saved grid image (PNG) as an image in every tracker."""
    if not accelerator.is_main_process or not accelerator.log_with:
        return
    import numpy as np
    from PIL import Image

    with Image.open(image_path) as im:
        rgb = im.convert("RGB")
    for name in ("tensorboard", "wandb"):
        try:
            tracker = accelerator.get_tracker(name, unwrap=False)
        except (ValueError, KeyError):
            continue
        if type(tracker).__name__ == "GeneralTracker":  # accelerate's stand-in for a tracker not in use
            continue
        if name == "tensorboard":
            tracker.log_images({tag: np.asarray(rgb)[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({tag: [rgb]}, step=step)


def close_trackers(accelerator) -> None:
    if accelerator.log_with:
        accelerator.end_training()


def accelerator_kwargs(report_to: str, out_dir: str | Path) -> dict[str, Any]:
    """`Accelerator(**accelerator_kwargs(...))`: log_with and the folder trackers write into."""
    names = trackers(report_to)
    # TensorBoard writes into project_dir / <project name> (accelerate's TensorBoardTracker)
    return {"log_with": names, "project_dir": str(Path(out_dir) / "tensorboard")} if names else {}


def launcher_precision(config_value: str, key: str) -> None:
    """The precision `accelerate launch --mixed_precision X` asks for (ACCELERATE_MIXED_PRECISION) must be
    the config's: a silent override would train at another precision than config.yaml records.
    ConfigError naming the key to set otherwise. `config_value`: "fp32", "bf16" or "fp16"."""
    # "no" is also what `accelerate launch` sets when nothing was asked, so only bf16/fp16 count as a request
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    ours = {"fp32": "no"}.get(config_value, config_value)
    if asked != "no" and asked != ours:
        raise ConfigError(f"the launcher asks for --mixed_precision {asked} but the config says {key}={config_value}; "
                          f"set {key}={asked} (the run files record the config's precision)")
