"""Export a fine-tuned VAR as one plain state dict in the official layout (adapters merged).

Example:
  arbooth export runs/flowers102_lora_d16/final --merge --out var_d16_flowers.safetensors \\
      --var-ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth
The file loads with `arbooth.models.load_var(...)` and, with --include-buffers, with the official
code's `load_state_dict(strict=True)` too. --out may not be (or overwrite) a file of the result folder or
a base checkpoint; it is checked before anything loads and written atomically.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from arbooth.errors import ConfigError
from arbooth.outputs import check_output, refuse_inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", help="a result folder of train-class (final/ or checkpoints/step_*)")
    parser.add_argument("--merge", action="store_true", help="fold LoRA/LNTuning into the weights (required)")
    parser.add_argument("--out", required=True, help="output .safetensors or .pth")
    parser.add_argument("--vae-ckpt", help="base tokenizer, if it moved since training")
    parser.add_argument("--var-ckpt", help="base transformer (LoRA/LNTuning), if it moved since training")
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
    out = export_merged(args.result, args.out, vae_ckpt=args.vae_ckpt, var_ckpt=args.var_ckpt,
                        include_buffers=args.include_buffers)
    print(f"wrote {out}")
    return 0
