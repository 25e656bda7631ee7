"""Sample class-conditional images from VAR into a PNG grid (one row per class).

Examples:
  arbooth sample --depth 16 --vae-ckpt vae_ch160v4096z32.pth --var-ckpt var_d16.pth \\
      --classes 207 88 --per-class 4 --cfg 1.5 --seed 0 --out grid.png
  arbooth sample --result runs/flowers102_lora_d16/final --classes 0 1 2 --out flowers.png
  arbooth sample --tiny --out outputs/tiny_grid.png      # a tiny random model: no weights needed
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arbooth.errors import ConfigError
from arbooth.outputs import (
    check_output,
    distinct_outputs,
    image_format,
    refuse_inputs,
    refuse_nested,
    save_image,
)

log = logging.getLogger(__name__)

DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # the official VAR demo's ImageNet classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=None, choices=(16, 20, 24, 30),
                        help="released VAR size (default 16); not with --result or --tiny, which decide it")
    parser.add_argument("--vae-ckpt", help="official vae_ch160v4096z32.pth (or .safetensors)")
    parser.add_argument("--var-ckpt", help="official var_d{depth}.pth (or .safetensors)")
    parser.add_argument("--result", help="a train-class result folder (final/ or checkpoints/step_*); "
                        "--vae-ckpt/--var-ckpt override the base checkpoints it recorded")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model (64x64, 10 classes)")
    parser.add_argument("--classes", type=int, nargs="+", help="class labels (default: demo classes; 0-3 with --tiny)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance >= 0 (ramped over scales)")
    parser.add_argument("--top-k", type=int, default=900, help="keep the k most likely tokens (>= 0; 0 = off)")
    parser.add_argument("--top-p", type=float, default=0.96, help="nucleus mass in [0, 1] (0 = off)")
    parser.add_argument("--more-smooth", action="store_true", help="gumbel smoothing (visualisation only)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image k (in the order of the grid) uses seed + k, whatever the batch size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast of the blocks")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--out", default="outputs/samples.png", help="PNG grid to write")
    parser.add_argument("--out-dir", help="also write each image here as class<label>_<i>.png (i counts the "
                        "images of that label over the whole run, so repeated classes never overwrite)")


def single_names(labels: list[int]) -> list[str]:
    """class<label>_<i>.png per image, i counting that label's images over the whole run (unique names)."""
    seen: dict[int, int] = {}
    names = []
    for label in labels:
        names.append(f"class{label:04d}_{seen.get(label, 0):02d}.png")
        seen[label] = seen.get(label, 0) + 1
    return names


def main(args: argparse.Namespace) -> int:
    if args.per_class < 1 or args.batch_size < 1:
        raise ConfigError("--per-class and --batch-size must be at least 1")
    # an option the chosen model ignores is refused, never silently dropped
    if args.tiny and (args.result or args.vae_ckpt or args.var_ckpt):
        raise ConfigError("--tiny builds a random model: it cannot be used with --result, --vae-ckpt or --var-ckpt")
    if args.depth is not None and (args.result or args.tiny):
        raise ConfigError(f"--depth cannot be used with {'--result' if args.result else '--tiny'}, which decides "
                          "the model's size")
    if args.classes and min(args.classes) < 0:
        raise ConfigError(f"--classes must be >= 0, got {min(args.classes)}")
    # outputs before any model loads: a bad path costs nothing
    check_output(args.out, what="grid")
    image_format(args.out)
    inputs = [args.result, args.vae_ckpt, args.var_ckpt]
    refuse_inputs([args.out], inputs)
    if args.out_dir:
        check_output(args.out_dir, folder=True, what="--out-dir")
        if args.result:
            refuse_nested(args.out_dir, args.result, what="--result")
    # heavy imports only now: a bad output path fails before torch loads
    from arbooth.models.sampling import check_sampling_args

    check_sampling_args(top_k=args.top_k, top_p=args.top_p, cfg=args.cfg)
    import torch
    from tqdm import tqdm

    from arbooth.data.images import save_grid, tensor_to_pil
    from arbooth.models.var_loading import load_var
    from arbooth.toy.tiny import build_tiny_var
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.result:
        from arbooth.adapt import load_finetuned

        var = load_finetuned(args.result, vae_ckpt=args.vae_ckpt, var_ckpt=args.var_ckpt, device=args.device).var
    elif args.tiny:
        var = build_tiny_var(seed=0, device=args.device)
    elif not (args.vae_ckpt and args.var_ckpt):
        raise ConfigError("pass --vae-ckpt and --var-ckpt (the official release files), or --tiny")
    else:
        var = load_var(depth=args.depth or 16, vae_ckpt=args.vae_ckpt, var_ckpt=args.var_ckpt, device=args.device)
    classes = args.classes or (list(range(min(4, var.num_classes))) if args.tiny or args.result
                               else list(DEMO_CLASSES))
    bad = [c for c in classes if not 0 <= c < var.num_classes]
    if bad:
        raise ConfigError(f"classes {bad} outside [0, {var.num_classes - 1}]")

    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    singles = [Path(args.out_dir) / n for n in single_names(labels.tolist())] if args.out_dir else []
    distinct_outputs([args.out, *singles])
    refuse_inputs(singles, inputs)
    images = []
    seeds = torch.arange(len(labels)) + args.seed  # image k: seed + k, whatever the batching
    for labels_b, seeds_b in tqdm(list(zip(labels.split(args.batch_size), seeds.split(args.batch_size))),
                                  desc="sampling", unit="batch"):
        images.append(var.generate(labels_b, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                   seed=seeds_b.tolist(), more_smooth=args.more_smooth, dtype=args.dtype).cpu())
    images_B3HW = torch.cat(images)

    path = save_grid(images_B3HW, args.out, nrow=args.per_class)
    for img, single in zip(images_B3HW, singles, strict=False):  # singles: empty without --out-dir
        save_image(tensor_to_pil(img), single)
    print(f"wrote {len(images_B3HW)} images to {path}" + (f" and {args.out_dir}/" if args.out_dir else ""))
    return 0
