"""Saving and loading the result of class-conditional fine-tuning.

A result folder (what `arbooth train-class` writes as `final/` or `checkpoints/step_*/`) holds:
- `arbooth.yaml`: the run's resolved config plus `result: {method, step, classes}`;
- LoRA / LNTuning: only the adapter, in peft's format (`adapter_model.safetensors`, `adapter_config.json`),
  so it needs the released base checkpoint to be used;
- FFT: `transformer.safetensors`, the whole transformer in the official key layout.

`load_finetuned(result_dir, vae_ckpt=..., var_ckpt=...)` rebuilds the tokenizer and a ready transformer
(adapters merged by default); `arbooth sample` and `arbooth export` call it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from arbooth.adapt.methods import PEFT_METHODS, MethodConfig, merge_adapters, unwrap_peft
from arbooth.checkpoint import read_state_dict, save_safetensors
from arbooth.config import from_dict, to_dict
from arbooth.errors import CheckpointError, ConfigError
from arbooth.model_card import recorded_path, shareable, write_model_card
from arbooth.outputs import write_text

log = logging.getLogger(__name__)

META_FILE = "arbooth.yaml"
ADAPTER_FILE = "adapter_model.safetensors"
TRANSFORMER_FILE = "transformer.safetensors"

# The released VAR family (FoundationVision/VAR models/__init__.py build_vae_var): width 64 per layer.
VAR_WIDTH_PER_DEPTH = 64


@dataclass(frozen=True)
class ModelConfig:
    """The `model` section of the class-conditional config (arbooth/recipes/class_config.py): which VAR,
    from which checkpoints. `build_vae_var` builds it; result folders record it."""

    depth: int = 16                       # transformer depth (16, 20, 24, 30 are released)
    vae_ckpt: str | None = None           # vae_ch160v4096z32.pth; None = random weights (tests only)
    var_ckpt: str | None = None           # var_d{depth}.pth; None = random weights (tests only)
    num_classes: int = 1000               # size of the pretrained class table; dataset labels index it
    embed_dim: int | None = None          # None = 64 * depth, as released
    num_heads: int | None = None          # None = depth, as released
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 4096
    z_channels: int = 32
    vae_ch: int = 160
    share_quant_resi: int = 4
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # released tokenizer: 16x down-sampling
    vae_num_res_blocks: int = 2           # resnet blocks per tokenizer level (released: 2)
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% slower

    def __post_init__(self) -> None:
        if self.depth < 1 or self.num_classes < 1:
            raise ConfigError("model.depth and model.num_classes must be positive")
        if list(self.patch_nums) != sorted(self.patch_nums) or not self.patch_nums:
            raise ConfigError(f"model.patch_nums must be increasing, got {self.patch_nums}")

    @property
    def width(self) -> int:
        return self.embed_dim or VAR_WIDTH_PER_DEPTH * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads or self.depth

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * 2 ** (len(self.vae_ch_mult) - 1)


def build_vae_var(model_cfg, *, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """Tokenizer and transformer for a `ModelConfig`: the official checkpoints loaded when both paths are
    set (any architecture the config describes, checked key by key), else random weights (tests, dry
    runs). `device="meta"` builds shapes only. The VAR keeps the tokenizer at `var.vae`."""
    from arbooth.models import VAR, VQVAE
    from arbooth.models.var_loading import load_official_weights

    m = model_cfg
    if (m.vae_ckpt is None) != (m.var_ckpt is None):
        raise ConfigError("set both model.vae_ckpt and model.var_ckpt (or neither, for random weights)")
    load = m.var_ckpt is not None
    with torch.device("meta" if load else device):
        vae = VQVAE(vocab_size=m.vocab_size, z_channels=m.z_channels, ch=m.vae_ch,
                    share_quant_resi=m.share_quant_resi, patch_nums=tuple(m.patch_nums),
                    ch_mult=tuple(m.vae_ch_mult), num_res_blocks=m.vae_num_res_blocks)
        var = VAR(vae, num_classes=m.num_classes, depth=m.depth, embed_dim=m.width, num_heads=m.heads,
                  mlp_ratio=m.mlp_ratio, norm_eps=1e-6, shared_aln=m.shared_aln, attn_l2_norm=True,
                  patch_nums=tuple(m.patch_nums), gradient_checkpointing=m.gradient_checkpointing)
    if load:
        var = load_official_weights(var, vae_ckpt=m.vae_ckpt, var_ckpt=m.var_ckpt, device=device)
    return var.vae, var


def build_prepared(model_cfg: ModelConfig, method_cfg: MethodConfig, *, seed: int
                   ) -> tuple[nn.Module, nn.Module, dict[str, str]]:
    """The training start of both class recipes: (tokenizer, transformer prepared for `method_cfg`, the
    base weights' `base_hashes`) on the CPU. Seeds the global RNG with `seed` first, so random-weight runs
    and LoRA's A matrices start the same on every rank; gradient checkpointing as `model_cfg` says
    (`build_vae_var` passes it to VAR's constructor)."""
    from arbooth.adapt.methods import prepare_for_method

    torch.manual_seed(seed)
    vae, var = build_vae_var(model_cfg, device="cpu")
    base = base_hashes(vae, var)
    model = prepare_for_method(var, method_cfg.name, lora_rank=method_cfg.lora_rank, lora_alpha=method_cfg.alpha,
                               lora_dropout=method_cfg.lora_dropout)
    return vae, model, base


def save_result_weights(model: nn.Module, method: str, folder: Path) -> None:
    """Write the method's weights into `folder`: the adapter only (peft format) or the full transformer."""
    folder = Path(folder)
    if method in PEFT_METHODS:
        from peft import get_peft_model_state_dict

        save_safetensors(get_peft_model_state_dict(model), folder / ADAPTER_FILE, metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(str(folder))
    else:
        from arbooth.models import official_state_dict

        save_safetensors(official_state_dict(unwrap_peft(model)), folder / TRANSFORMER_FILE,
                         metadata={"format": "pt"})


def load_result_weights(model: nn.Module, method: str, folder: Path) -> None:
    """Load what `save_result_weights` wrote into a model prepared for the same method (strict)."""
    folder = Path(folder)
    if method in PEFT_METHODS:
        from peft import set_peft_model_state_dict

        sd = read_state_dict(folder / ADAPTER_FILE)
        res = set_peft_model_state_dict(model, sd)
        unexpected = list(res.unexpected_keys)
        missing = [k for k in res.missing_keys if "lora_" in k or "ln_tuning_layers" in k]
        if unexpected or missing:
            raise CheckpointError(f"adapter in {folder} does not fit the model: missing {missing[:6]}, "
                                  f"unexpected {unexpected[:6]}")
    else:
        unwrap_peft(model).load_state_dict(read_state_dict(folder / TRANSFORMER_FILE))


def write_result_meta(folder: Path, cfg: Any, *, step: int, classes: list[str],
                      base: dict[str, str] | None = None, run: dict | None = None) -> None:
    """arbooth.yaml: the config plus `result: {method, step, classes, base, run}`. `base` holds the SHA-256
    of the base tokenizer's and transformer's tensors (`load_finetuned` checks them); `run` the run id
    and its sessions (arbooth/runs.py)."""
    meta = shareable(to_dict(cfg))  # file names, not this machine's paths: a result folder is what users share
    meta["result"] = {"method": cfg.method.name, "step": int(step), "classes": list(classes),
                      "base": dict(base or {}), "run": dict(run or {})}
    write_text(Path(folder) / META_FILE, yaml.safe_dump(meta, sort_keys=False))


def write_class_card(folder: Path, cfg, base: dict[str, str], classes: list[str], metrics: dict,
                     privacy: dict | None = None) -> Path:
    """The model card of a class-conditional result folder (`final/`): README.md with the newest sample
    grid of the run, the last logged metrics and, for DP, epsilon and delta."""
    grids = sorted((Path(folder).parent / "samples").glob("step_*.png"))
    base_name = cfg.model.var_ckpt or f"random VAR-d{cfg.model.depth}"
    adapter = cfg.method.name != "fft"
    usage = (f"from arbooth.adapt.finetuned import load_finetuned\n"
             f"ft = load_finetuned({Path(folder).name!r}, vae_ckpt=..., var_ckpt=...)  # the base checkpoints\n"
             "images = ft.var.generate(labels_B, cfg=1.5, seed=0)  # (B, 3, H, W) in [0, 1]")
    return write_model_card(folder, title=f"VAR-d{cfg.model.depth} fine-tuned ({cfg.method.name})",
                            summary=f"Class-conditional VAR-d{cfg.model.depth} fine-tuned with arbooth "
                                    f"({cfg.method.name}) on {len(classes)} classes.",
                            base_model=base_name, base_sha256=base.get("var_sha256"), method=cfg.method.name,
                            adapter=adapter, tags=["var", "class-conditional", "image-generation"],
                            prompts=[f"class {i}: {c}" for i, c in enumerate(classes)],
                            grid=grids[-1] if grids else None, metrics=metrics, privacy=privacy, usage=usage)


@dataclass(frozen=True)
class Finetuned:
    vae: nn.Module
    var: nn.Module
    method: str
    step: int
    classes: tuple[str, ...]
    config: dict[str, Any]      # the run's resolved config as recorded (type it with the recipe's config class)
    model_config: ModelConfig   # the model section, with the checkpoint paths actually used


def read_result_config(result_dir: str | Path) -> tuple[dict[str, Any], str, int, tuple[str, ...]]:
    """(resolved training config as a plain dict, method, step, classes) of a result folder. The dict
    is what the recipe wrote; the recipe's config class types it (`from_dict(ClassTrainConfig, d)`)."""
    path = Path(result_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{result_dir} is not an arbooth result folder (no {META_FILE})")
    try:
        meta = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid YAML ({type(e).__name__}); the result folder is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("result"), dict):
        raise CheckpointError(f"{path} has no `result:` section (method, step, classes); the result folder "
                              "is damaged or was not written by arbooth train-class")
    res = meta.pop("result")
    missing = [k for k in ("method", "step", "classes") if k not in res]
    if missing:
        raise CheckpointError(f"{path}: `result:` lacks {', '.join(missing)}")
    try:
        return meta, str(res["method"]), int(res["step"]), tuple(res["classes"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable `result:` section: {e}") from None


def base_hashes(vae: nn.Module, var: nn.Module) -> dict[str, str]:
    """SHA-256 of the base tokenizer's and transformer's tensors (before any adapter), recorded with every
    result so that `load_finetuned` refuses to apply it to another base (README "Results")."""
    from arbooth.adapt.selective import tensors_sha256

    return {"vae_sha256": tensors_sha256(vae.state_dict()),
            "var_sha256": tensors_sha256({k: v for k, v in var.state_dict().items() if not k.startswith("vae.")})}


def check_base(result_dir: str | Path, vae: nn.Module, var: nn.Module | None, *, vae_ckpt: str | None,
               var_ckpt: str | None) -> None:
    """Refuse a base that is not the one the result was trained on: compares the SHA-256 of the base
    tensors (as `base_hashes` computes them) with `result.base` of arbooth.yaml. `var` None
    skips the transformer (FFT results carry their whole transformer). A result written before the
    hashes were recorded is accepted with a warning. Raises CheckpointError naming both hashes."""
    from arbooth.adapt.selective import tensors_sha256

    meta = yaml.safe_load((Path(result_dir) / META_FILE).read_text())
    base = (meta.get("result") or {}).get("base") or {}
    if not base:
        log.warning("%s records no base checkpoint hash (an older result): the base cannot be checked",
                    result_dir)
        return
    pairs = [("vae", vae_ckpt, tensors_sha256(vae.state_dict()))]
    if var is not None:
        pairs.append(("var", var_ckpt, tensors_sha256({k: v for k, v in var.state_dict().items()
                                                       if not k.startswith("vae.")})))
    for what, path, got in pairs:
        want = base.get(f"{what}_sha256")
        if want is not None and want != got:
            raise CheckpointError(f"{result_dir} was trained on a base {what} with tensor hash {want[:16]}, but "
                                  f"{path or 'the random init'} has {got[:16]}: pass the base it was "
                                  f"trained on (--{what}-ckpt)")


def load_finetuned(result_dir: str | Path, *, vae_ckpt: str | None = None, var_ckpt: str | None = None,
                   device: str | torch.device = "cpu", merge: bool = True) -> Finetuned:
    """Rebuild a fine-tuned VAR from a result folder.

    The base checkpoints default to the paths recorded at training time; pass `vae_ckpt`/`var_ckpt`
    when they moved. LoRA/LNTuning need the base transformer (`var_ckpt`); FFT only the tokenizer.
    With `merge` (default) the adapters are folded in and a plain VAR is returned; otherwise the
    peft-wrapped model (adapters separate, e.g. to continue training).
    """
    from arbooth.adapt.methods import prepare_for_method

    config, method, step, classes = read_result_config(result_dir)
    try:
        model_cfg = from_dict(ModelConfig, config.get("model", {}), "model.")
        method_cfg = from_dict(MethodConfig, config.get("method", {}), "method.")
    except ConfigError as e:
        raise CheckpointError(f"{Path(result_dir) / META_FILE}: the recorded config does not load: {e}") from None
    # arbooth.yaml records file names only (model_card.shareable); the run folder's config.yaml has the paths
    local = [Path(result_dir).parent / "config.yaml", Path(result_dir).parent.parent / "config.yaml"]
    mc = replace(model_cfg, vae_ckpt=vae_ckpt or recorded_path(model_cfg.vae_ckpt, "model.vae_ckpt", local),
                 var_ckpt=var_ckpt or recorded_path(model_cfg.var_ckpt, "model.var_ckpt", local))
    torch.manual_seed(int(config.get("train", {}).get("seed", 0)))  # random-weight runs (tests, dry runs): the same init as in training
    if method in PEFT_METHODS or mc.var_ckpt is not None:
        vae, var = build_vae_var(mc)
    else:  # FFT: the transformer comes whole from the result; only the tokenizer is needed from outside
        vae, var = build_vae_var(replace(mc, vae_ckpt=None, var_ckpt=None))
        if mc.vae_ckpt is not None:
            vae.load_state_dict(read_state_dict(mc.vae_ckpt))
    check_base(result_dir, vae, var if method in PEFT_METHODS else None, vae_ckpt=mc.vae_ckpt,
               var_ckpt=mc.var_ckpt)
    if method in PEFT_METHODS and mc.var_ckpt is None:
        log.warning("%s: no base var_ckpt recorded or given; the adapter is applied to random weights "
                    "re-drawn from the run's seed", result_dir)
    model = prepare_for_method(var, method, lora_rank=method_cfg.lora_rank, lora_alpha=method_cfg.alpha,
                               lora_dropout=method_cfg.lora_dropout)
    load_result_weights(model, method, Path(result_dir))
    model.requires_grad_(False)
    model = merge_adapters(model) if merge else model
    return Finetuned(vae=vae.to(device).eval(), var=model.to(device).eval(), method=method, step=step,
                     classes=classes, config=config, model_config=mc)
