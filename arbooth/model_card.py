"""Model cards: the README.md with YAML front matter that every finished result carries.

A hub (and `huggingface_hub.ModelCard.load`) reads the front matter: `library_name`, `base_model`,
`license`, `tags`, plus arbooth's own keys (`base_model_sha256`, `method`, and `epsilon` / `delta` for a
differentially private result). The body says what the result is, how it was made, its prompts or
classes, the sample grid (copied into the folder as `grid.png`, so the card shows it wherever the folder
goes) and its metrics. As diffusers' training scripts do (`save_model_card`), the card is built with
`huggingface_hub.ModelCard` (huggingface_hub/repocard.py).

Nothing local leaks into a card: `shareable` turns absolute paths into their file names (the base is
named by its hash, `base_model_sha256`), for the cards and for the metadata written beside them
(arbooth.yaml, a personalization's recorded config). The run folder's own config.yaml, which stays on
the machine, keeps the paths as given: `recorded_path` finds a recorded base checkpoint there again, so
loading a result next to its run needs no path arguments.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arbooth.outputs import atomic_write, write_text

CARD_FILE = "README.md"
GRID_FILE = "grid.png"


def shareable(value: Any) -> Any:
    """`value` (nested dicts / lists / strings) with every absolute path string replaced by its file name:
    what a user publishes must not name their home folder. Relative paths and other strings stay."""
    if isinstance(value, Mapping):
        return {k: shareable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(shareable(v) for v in value)
    if isinstance(value, str) and os.path.isabs(value) and len(value) > 1:
        return Path(value).name
    return value


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_model_card(folder: str | os.PathLike, *, title: str, summary: str, base_model: str,
                     base_sha256: str | None, method: str, adapter: bool = False,
                     license: str = "other", tags: Sequence[str] = (), prompts: Sequence[str] = (),
                     grid: str | os.PathLike | None = None, metrics: Mapping[str, Any] | None = None,
                     privacy: Mapping[str, float] | None = None, usage: str = "") -> Path:
    """Write `folder/README.md` (atomically) and return its path.

    `base_model`: the base's name (a checkpoint's file name, `toy`, ...; an absolute path is cut to its
    name); `base_sha256`: the hash arbooth checks the base by; `adapter`: the result is a peft adapter
    (adds `peft` to the tags); `license`: the card's license field (the base weights' own license governs
    a fine-tune of them; `other` when unknown); `prompts`: the prompts or class names the grid shows;
    `grid`: an image, copied into `folder` as grid.png unless it is already there; `metrics`: flat
    name -> value; `privacy`: {"epsilon": ..., "delta": ...} for a DP result (both go into the front
    matter too); `usage`: a code block's text showing how to load it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    all_tags = ["arbooth", *tags] + (["peft", "lora"] if adapter and "lora" in method else
                                     ["peft"] if adapter else [])
    extra: dict[str, Any] = {"method": method}
    if base_sha256:
        extra["base_model_sha256"] = base_sha256
    if privacy:
        extra |= {k: float(v) for k, v in privacy.items()}
        all_tags.append("differential-privacy")
    data = ModelCardData(library_name="arbooth", base_model=shareable(base_model), license=license,
                         tags=list(dict.fromkeys(all_tags)), **extra)
    lines = [f"# {title}", "", summary, ""]
    lines += ["## Base model", "", f"`{shareable(base_model)}`" + (f" (tensor SHA-256 `{base_sha256}`)"
                                                                   if base_sha256 else ""), ""]
    lines += ["## Method", "", method + (" (a peft adapter: the base weights are needed to use it)"
                                         if adapter else ""), ""]
    if privacy:
        lines += ["## Privacy", "", "Trained with DP-SGD: (" + ", ".join(f"{k} = {_fmt(v)}" for k, v in
                                                                        privacy.items()) + ")-differential "
                  "privacy with respect to one training image (docs/privacy.md).", ""]
    if prompts:
        lines += ["## Prompts", "", *[f"- {p}" for p in prompts], ""]
    if grid is not None and Path(grid).is_file():
        target = folder / GRID_FILE
        if Path(grid).resolve() != target.resolve():
            atomic_write(target, lambda tmp: shutil.copyfile(grid, tmp))
        lines += ["## Samples", "", f"![samples]({GRID_FILE})", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |",
                  *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()], ""]
    if usage:
        lines += ["## Use", "", "```python", usage.strip(), "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return write_text(folder / CARD_FILE, str(card))


def recorded_path(recorded: str | None, key: str, local_configs: Sequence[str | os.PathLike]) -> str | None:
    """The checkpoint path to use for a result's recorded `recorded` (a file name once `shareable` cut it):
    itself when it exists, else the path under dotted `key` (e.g. "model.var_ckpt") of the first of
    `local_configs` (run folders' config.yaml) whose value has the same file name and exists, else
    `recorded` unchanged (the loader then names the missing file)."""
    if not recorded or Path(recorded).exists():
        return recorded
    import yaml

    for cfg_path in local_configs:
        try:
            value: Any = yaml.safe_load(Path(cfg_path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and Path(value).name == Path(recorded).name and Path(value).exists():
            return value
    return recorded
