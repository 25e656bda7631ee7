"""The personalization file: only the tuned tensors and <S*>, applied on top of a base Infinity.

safetensors layout: `model.<name>` for every tuned tensor of the model's state_dict (our names,
e.g. `model.blocks.3.ca.q.weight`), `subject_token` (P, C). Metadata (strings): `format`,
`config` (the resolved training config as JSON), `base_model` (how the base was identified: the
sha256 of the checkpoint file, or the tiny preset and seed), `base_tuned_sha256` (hash of the BASE
values of the tuned tensors: `apply` refuses a different base model), `placeholder`, `class_noun`,
`instance_template`.

Generation with it (what `arbooth generate --personalization FILE` does)::

    pers = load_personalization(path)
    pers.apply(model)                                            # before generating
    text_BTC, mask_BT = pers.encode(tokenizer, t5_encoder, prompts, max_length=model.text_maxlen)
    out = model.generate(text_BTC, mask_BT, schedule, ...)

Prompts write the subject as "<S*>" ("a <S*> dog wearing a santa hat"); prompts without it are
encoded normally.

A LoRA personalization is a folder in peft's adapter format, so peft and other LoRA readers load it
as they load any adapter (`PeftModel.from_pretrained(base_infinity, folder)` gives the same model as
`apply`)::

    personalization/
        adapter_config.json         peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules
        adapter_model.safetensors   peft's key names: base_model.model.blocks.3.ca.q.lora_A.weight (r, in)
        personalization.safetensors subject_token (P, C) and the metadata above (no model tensors)
        README.md                   the model card (written by the recipe)

`load_personalization` takes the folder or any file inside it, and the single-file LoRA layout written
before (adapters as `model.<name>.lora_A.weight` beside the token, rank and alpha as metadata).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from arbooth.adapt.selective import tensors_sha256, tuned_parameter_names
from arbooth.adapt.subject_lora import (
    LoRASpec,
    base_weights_sha256,
    inject_lora,
    merged_weights,
    spec_from_metadata,
)
from arbooth.adapt.subject_token import (
    PLACEHOLDER,
    add_placeholder_token,
    encode_prompts,
    splice_subject_token,
)
from arbooth.checkpoint import commit_dir, partial_dir, save_safetensors
from arbooth.errors import CheckpointError
from arbooth.models.infinity_keys import from_official_name

FORMAT = "arbooth-personalization/1"
_MODEL_PREFIX = "model."
ADAPTER_CONFIG = "adapter_config.json"          # peft's names (peft/utils/constants.py)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SUBJECT_FILE = "personalization.safetensors"    # <S*> and arbooth's metadata, inside a LoRA folder
_PEFT_PREFIX = "base_model.model."              # what PeftModel's state_dict puts before the model's names
_WRONG_BASE = ("this personalization was trained on a different base model (or was already applied); "
               "load the base checkpoint it names: ")


@dataclass
class Personalization:
    tensors: dict[str, torch.Tensor]          # model state_dict name -> tuned value
    subject_token_PC: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def placeholder(self) -> str:
        return self.metadata.get("placeholder", PLACEHOLDER)

    @property
    def config(self) -> dict:
        return json.loads(self.metadata.get("config", "{}"))

    @property
    def kind(self) -> str:
        """"full" (tuned tensors; files written before LoRA existed have no `kind`) or "lora" (adapters)."""
        return self.metadata.get("kind", "full")

    def apply(self, model: nn.Module, *, check_base: bool = True) -> None:
        """Put the personalization into `model` (in place): full: copy the tuned tensors in; lora: inject
        the adapters (peft layers, enabled, frozen). Checks names, shapes and, unless `check_base=False`,
        that `model` holds the base weights the personalization was trained from."""
        if self.kind == "lora":
            spec, dtype = spec_from_metadata(self.metadata)
            expected = self.metadata.get("base_tuned_sha256")
            if check_base and expected and base_weights_sha256(model, spec.targets, dtype) != expected:
                raise CheckpointError(_WRONG_BASE + self.metadata.get("base_model", "?"))
            inject_lora(model, spec, self.tensors)
            return
        if self.kind != "full":
            raise CheckpointError(f"unknown personalization kind {self.kind!r} (this arbooth knows full and lora)")
        # files written before Infinity's raw tensors moved into leaf modules name them the released way
        # (`blocks.0.sa.scale_mul_1H11`); the hash below stays over the file's own names
        model_name = {k: from_official_name(k) for k in self.tensors}
        all_params = dict(model.named_parameters())
        missing = [k for k in self.tensors if model_name[k] not in all_params]
        if missing:
            raise CheckpointError(f"personalization tensors not in the model: {missing[:5]}")
        params = {k: all_params[model_name[k]] for k in self.tensors}
        shapes = [f"{k}: {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                  for k, v in self.tensors.items() if v.shape != params[k].shape]
        if shapes:
            raise CheckpointError("personalization does not fit the model: " + "; ".join(shapes[:5]))
        expected = self.metadata.get("base_tuned_sha256")
        if check_base and expected:
            current = tensors_sha256({k: params[k].detach().to(self.tensors[k].dtype) for k in self.tensors})
            if current != expected:
                raise CheckpointError(_WRONG_BASE + self.metadata.get("base_model", "?"))
        with torch.no_grad():
            for k, v in self.tensors.items():
                params[k].copy_(v)

    def encode(self, tokenizer, encoder: nn.Module, prompts: Sequence[str], *, max_length: int,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """T5-encode `prompts` and splice <S*> where they name it: (text (B, T, C), mask (B, T))."""
        add_placeholder_token(tokenizer, encoder, self.placeholder)
        feats, mask, ph = encode_prompts(tokenizer, encoder, prompts, max_length=max_length,
                                         placeholder=self.placeholder,
                                         prefix_length=self.subject_token_PC.shape[0], device=device)
        return splice_subject_token(feats, mask, ph, self.subject_token_PC.to(feats))


def save_personalization(path: str | Path, tuned: Mapping[str, torch.Tensor], subject_token_PC: torch.Tensor, *,
                         base_tuned_sha256: str, metadata: Mapping[str, str]) -> Path:
    """Write the personalization file atomically; `tuned` maps model names to tensors."""
    tensors = {_MODEL_PREFIX + k: v for k, v in tuned.items()}
    tensors["subject_token"] = subject_token_PC
    meta = {"format": FORMAT, "base_tuned_sha256": base_tuned_sha256, **{k: str(v) for k, v in metadata.items()}}
    save_safetensors(tensors, path, metadata=meta)
    return Path(path)


def save_lora_personalization(folder: str | Path, spec: LoRASpec, adapters: Mapping[str, torch.Tensor],
                              subject_token_PC: torch.Tensor, *, base_tuned_sha256: str, base_name: str,
                              metadata: Mapping[str, str]) -> Path:
    """Write a LoRA personalization as a peft adapter folder (module docstring), atomically as a whole.
    `adapters` maps our names (`blocks.3.ca.q.lora_A.weight`) to tensors; `base_name` goes into
    adapter_config.json's `base_model_name_or_path` (a name, never a local path)."""
    folder = Path(folder)
    partial = partial_dir(folder)
    config = spec.peft_config()
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(partial))
    save_safetensors({_PEFT_PREFIX + k: v for k, v in adapters.items()}, partial / ADAPTER_WEIGHTS,
                     metadata={"format": "pt"})
    meta = {"format": FORMAT, "base_tuned_sha256": base_tuned_sha256, **{k: str(v) for k, v in metadata.items()}}
    save_safetensors({"subject_token": subject_token_PC}, partial / SUBJECT_FILE, metadata=meta)
    commit_dir(partial, folder)
    return folder


def personalization_root(path: str | Path) -> Path:
    """The folder of a LoRA personalization given as the folder or a file inside it, else `path` itself."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent if (path.parent / ADAPTER_CONFIG).is_file() and path.name in (
        ADAPTER_CONFIG, ADAPTER_WEIGHTS, SUBJECT_FILE, "README.md") else path


def is_personalization(path: str | Path) -> bool:
    """True for a personalization file or LoRA folder (or a file in one); reads no tensors."""
    root = personalization_root(path)
    target = root / SUBJECT_FILE if root.is_dir() else root
    if not target.is_file():
        return False
    try:
        with safe_open(str(target), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 (safetensors raises several types for a file that is not one)
        return False


def _read_safetensors(path: Path, device: str | torch.device) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for a bad file
        raise CheckpointError(f"cannot read personalization {path}: {type(e).__name__}: {e}") from e


def _read_lora_folder(folder: Path, device: str | torch.device) -> Personalization:
    """A peft-format LoRA personalization folder; rank, alpha and dropout come from adapter_config.json
    (what peft uses), the exact layer list from arbooth's metadata."""
    subject = folder / SUBJECT_FILE
    if not subject.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: a LoRA personalization folder needs {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS} "
                              f"and {SUBJECT_FILE}")
    metadata, tensors = _read_safetensors(subject, device)
    if metadata.get("format") != FORMAT or "subject_token" not in tensors:
        raise CheckpointError(f"{subject} is not an arbooth personalization file (format {metadata.get('format')!r})")
    _check_metadata(subject, metadata)
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        rank, alpha, dropout = int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a readable peft LoRA config ({type(e).__name__}: "
                              f"{e})") from None
    metadata |= {"kind": "lora", "lora_rank": str(rank), "lora_alpha": repr(alpha), "lora_dropout": repr(dropout)}
    _, weights = _read_safetensors(folder / ADAPTER_WEIGHTS, device)
    foreign = [k for k in weights if not k.startswith(_PEFT_PREFIX)]
    if foreign:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: keys without peft's {_PEFT_PREFIX!r} prefix: {foreign[:3]}")
    adapters = {k[len(_PEFT_PREFIX):]: v for k, v in weights.items()}
    return Personalization(adapters, tensors["subject_token"], metadata)


def _check_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """CheckpointError naming the file for metadata that later steps could not use."""
    if "config" not in metadata:
        raise CheckpointError(f"{path}: damaged personalization file: its metadata has no 'config' entry "
                              "(the training config that names the base model)")
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged personalization file: its 'config' metadata is not valid JSON "
                              f"({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: damaged personalization file: its 'config' metadata is not a JSON object")
    if not metadata.get("base_tuned_sha256"):
        raise CheckpointError(f"{path}: damaged personalization file: its metadata has no 'base_tuned_sha256' "
                              "entry (the hash that identifies the base model)")


def load_personalization(path: str | Path, device: str | torch.device = "cpu") -> Personalization:
    """A personalization from a single file (full, or LoRA as written before the peft folder) or a LoRA
    folder in peft's format (the folder or any file in it). CheckpointError naming the file otherwise."""
    path = personalization_root(path)
    if path.is_dir():
        if not (path / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{path} is a folder but not a LoRA personalization (no {ADAPTER_CONFIG})")
        return _read_lora_folder(path, device)
    if not path.is_file():
        raise CheckpointError(f"personalization file not found: {path}")
    metadata, tensors = _read_safetensors(path, device)
    if metadata.get("format") != FORMAT or "subject_token" not in tensors:
        raise CheckpointError(f"{path} is not an arbooth personalization file (format {metadata.get('format')!r})")
    _check_metadata(path, metadata)
    token = tensors.pop("subject_token")
    tuned = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
    return Personalization(tuned, token, metadata)


def merge_lora_personalization(pers: Personalization, base: nn.Module, *, dtype: torch.dtype | None = None,
                               check_base: bool = True) -> Personalization:
    """A LoRA personalization as a full one: every tensor of the sub-layers it adapted (as the full
    recipe would have trained them), the adapted weights merged W + (alpha / r) B A in fp32 and stored
    in `dtype` (default: the dtype the base blocks had in training, bf16 at 2B), the rest copied from
    `base` (the plain base model, e.g. from PersonalizedSampler's build). `base` is not modified.
    The result's `base_tuned_sha256` is the full kind's, so `apply` and `generate` take it as any full file.
    """
    if pers.kind != "lora":
        raise CheckpointError("only a LoRA personalization can be merged (this one is already full)")
    spec, base_dtype = spec_from_metadata(pers.metadata)
    dtype = dtype or base_dtype
    if check_base and base_weights_sha256(base, spec.targets, base_dtype) != pers.metadata.get("base_tuned_sha256"):
        raise CheckpointError(_WRONG_BASE + pers.metadata.get("base_model", "?"))
    kinds = sorted({t.split(".")[2] for t in spec.targets})
    params = dict(base.named_parameters())
    names = tuned_parameter_names(base, kinds)
    merged = merged_weights(base, spec, pers.tensors)
    originals = {k: params[k].detach().to(dtype) for k in names}
    tensors = {k: merged[k].to(dtype) if k in merged else originals[k].clone() for k in names}
    config = pers.config
    if config:
        config.setdefault("tuning", {})["method"] = "full"
    meta = {k: v for k, v in pers.metadata.items() if k not in ("kind", "lora_rank", "lora_alpha", "lora_dropout",
                                                                "lora_targets", "base_dtype")}
    meta |= {"kind": "full", "config": json.dumps(config), "base_tuned_sha256": tensors_sha256(originals),
             "merged_from": f"LoRA r={spec.rank} alpha={spec.alpha:g}"}
    return Personalization(tensors, pers.subject_token_PC.clone(), meta)
