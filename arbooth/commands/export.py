"""Export a result with its adapters merged: a fine-tuned VAR as one official-layout state dict, a LoRA personalization as a full one.

A fine-tuned VAR becomes one plain state dict in the official layout (adapters merged); a LoRA
personalization of Infinity becomes a full one (the tuned tensors, adapters merged).

Examples:
  arbooth export runs/flowers102_lora_d16/final --merge --out var_d16_flowers.safetensors \\
      --var-ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth
  arbooth export runs/my_dog/personalization --merge --out my_dog_full.safetensors \\
      [--model-ckpt infinity_2b_reg.pth --vae-ckpt infinity_vae_d32_reg.pth --t5 flan-t5-xl] [--dtype bf16]
The VAR file loads with `arbooth.models.load_var(...)` and, with --include-buffers, with the official
code's `load_state_dict(strict=True)` too. The merged personalization holds every tensor of the adapted
sub-layers (W + alpha/r B A for the adapted weights) and <S*>, like the full recipe's file (3 GB at 2B),
and is used the same way (`arbooth generate --personalization`).
--out may not be (or overwrite) a file of the result folder or a base checkpoint;
it is checked before anything loads and written atomically.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from arbooth.errors import ConfigError
from arbooth.outputs import check_output, refuse_inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", help="a result folder of train-class (final/ or checkpoints/step_*), or a LoRA "
                        "personalization of train-subject (its personalization/ folder or a file in it)")
    parser.add_argument("--merge", action="store_true", help="fold LoRA/LNTuning into the weights (required)")
    parser.add_argument("--out", required=True, help="output .safetensors or .pth")
    parser.add_argument("--vae-ckpt", help="base tokenizer, if it moved since training")
    parser.add_argument("--var-ckpt", help="base transformer (LoRA/LNTuning), if it moved since training")
    parser.add_argument("--model-ckpt", help="personalization: base Infinity checkpoint, if it moved since training")
    parser.add_argument("--t5", help="personalization: flan-t5-xl folder, if it moved since training")
    parser.add_argument("--dtype", choices=("bf16", "fp32"),
                        help="personalization: dtype of the merged tensors (default: the blocks' dtype in training)")
    parser.add_argument("--include-buffers", action="store_true",
                        help="add the official constant buffers (for the official strict loader)")


def export_merged(result: str | Path, out: str | Path, *, vae_ckpt: str | None = None,
                  var_ckpt: str | None = None, include_buffers: bool = False) -> Path:
    out = check_output(Path(out))  # before the heavy imports and any model load
    if out.suffix not in (".safetensors", ".pth", ".pt"):
        raise ConfigError(f"--out must end in .safetensors or .pth, got {out.name}")
    refuse_inputs([out], [result, vae_ckpt, var_ckpt, *_recorded_bases(result)])
    from arbooth.adapt.finetuned import load_finetuned
    from arbooth.checkpoint import save_safetensors, save_torch
    from arbooth.models import official_state_dict

    ft = load_finetuned(result, vae_ckpt=vae_ckpt, var_ckpt=var_ckpt, merge=True)
    sd = official_state_dict(ft.var, include_buffers=include_buffers)
    if out.suffix == ".safetensors":
        save_safetensors(sd, out, metadata={"format": "pt", "arbooth_method": ft.method, "step": str(ft.step)})
    else:
        save_torch({k: v.detach().cpu() for k, v in sd.items()}, out)
    return out


def _recorded_bases(result: str | Path) -> list[str | None]:
    """The base checkpoints a result folder records (inputs of the export too); none if unreadable
    (load_finetuned then reports the folder's problem)."""
    from arbooth.adapt.finetuned import read_result_config
    from arbooth.errors import ArboothError

    try:
        model = read_result_config(result)[0].get("model") or {}
    except ArboothError:
        return []
    return [model.get("vae_ckpt"), model.get("var_ckpt")] if isinstance(model, dict) else []


def main(args: argparse.Namespace) -> int:
    if not args.merge:
        raise ConfigError("only merged export is supported (pass --merge); the adapter itself is already "
                          f"saved in peft's format in {args.result}")
    from arbooth.adapt.personalization import is_personalization
    if is_personalization(args.result):  # a personalization file, or a LoRA personalization folder
        from arbooth.subject_bases import export_merged_personalization
        out = export_merged_personalization(args.result, args.out, model_ckpt=args.model_ckpt,
                                            vae_ckpt=args.vae_ckpt, t5=args.t5, dtype=args.dtype)
        print(f"wrote {out}")
        return 0
    out = export_merged(args.result, args.out, vae_ckpt=args.vae_ckpt, var_ckpt=args.var_ckpt,
                        include_buffers=args.include_buffers)
    print(f"wrote {out}")
    return 0
