"""Generate images from text prompts with Infinity (the 2B or 8B release, its BSQ-VAE and flan-t5-xl).

Example:
  arbooth generate --prompt "a corgi on the beach" --model-ckpt weights/infinity_2b_reg.pth \\
      --vae-ckpt weights/infinity_vae_d32_reg.pth --t5 weights/flan-t5-xl --out corgi.png

Infinity-8B: --model-ckpt is the sharded weights folder (index json + shards) and --vae-ckpt the
spatial-patchify tokenizer; the sizes follow from the VAE file (use --pn 0.25M with the 512x512 folder):
  arbooth generate --prompt "a corgi on the beach" --model-ckpt weights/infinity_8b_weights \\
      --vae-ckpt weights/infinity_vae_d56_f8_14_patchify.pth --t5 weights/flan-t5-xl --out corgi.png

With a personalization file from train_subject.py, prompts may name the subject as <S*>; the base
checkpoints default to those recorded in the file:
  arbooth generate --personalization runs/my_dog/personalization.safetensors \\
      --prompt "a <S*> dog wearing a santa hat" --n 4 --out santa.png

Defaults are the released inference settings (scripts/infer.sh): 1024x1024, cfg 4, tau 0.5,
top-k 900, top-p 0.97. With several images, `--out x.png` writes x_000.png, ... and the grid x.png.
Image k (prompts in order, --n images each) is sampled from seed + k alone, whatever --batch-size.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from arbooth.errors import ConfigError
from arbooth.outputs import check_output, distinct_outputs, refuse_inputs, save_image

if TYPE_CHECKING:  # torch is imported inside main, after the output checks
    import torch

log = logging.getLogger(__name__)


def _floats(text: str) -> list[float] | float:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several)")
    p.add_argument("--model-ckpt", help="Infinity weights: a file (infinity_2b_reg.pth) or a sharded folder "
                                        "with its index json (Infinity-8B: infinity_8b_weights/)")
    p.add_argument("--vae-ckpt", help="BSQ-VAE weights: infinity_vae_d32_reg.pth (2B) or "
                                      "infinity_vae_d56_f8_14_patchify.pth (8B); it sets the model sizes")
    p.add_argument("--t5", help="T5 folder, or a hub name in the local HF cache (default google/flan-t5-xl)")
    p.add_argument("--personalization", type=Path,
                   help="personalization.safetensors from train_subject.py, or its LoRA folder personalization/ (uses its <S*>, tuned weights, "
                        "base model and training resolution; --cfg/--tau default to its validation settings)")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cfg", type=_floats, default=None,
                   help="guidance scale >= 0 (1 = none), or one per scale (comma list); default 4")
    p.add_argument("--tau", type=_floats, default=None, help="temperature > 0, or one per scale; default 0.5")
    p.add_argument("--top-k", type=int, default=900, help="keep the k most likely tokens (>= 0; 0 = off)")
    p.add_argument("--top-p", type=float, default=0.97, help="nucleus mass in [0, 1] (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k, whatever the batch size")
    p.add_argument("--h-div-w", type=float, default=None,
                   help="aspect ratio > 0 (nearest template is used); default 1; not with --personalization")
    p.add_argument("--pn", default=None, choices=["0.06M", "0.25M", "0.60M", "1M"],
                   help="pixel budget; default 1M; not with --personalization (its training resolution is used)")
    p.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast on the GPU")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every scale (slow reference)")
    p.add_argument("--lvl-embed-every-chunk", action="store_true",
                   help="ARBooth fork behaviour; not with --personalization (its base is rebuilt as trained)")
    p.add_argument("--next-scale-mode", default="trilinear", choices=["trilinear", "area"],
                   help="next-scale interpolation ('area': ARBooth fork); also with --personalization")
    p.add_argument("--model-kwargs", type=_json_dict, default=None,
                   help="Infinity constructor overrides (JSON), on top of the sizes the VAE file selects; "
                        "not with --personalization")
    p.add_argument("--vae-kwargs", type=_json_dict, default=None,
                   help="BSQVAE constructor arguments (JSON) for other tokenizers, e.g. "
                        '\'{"codebook_dim": 14, "ch_mult": [1, 2, 4, 4], "patch_size": 8, "spatial_patchify": true}\'; '
                        "given, the sizes start from the 2B defaults; not with --personalization")


# Options that a personalization file decides (its base model, as trained, and its resolution): given with
# --personalization they would do nothing, so they are refused.
_FIXED_BY_PERSONALIZATION = {"h_div_w": "--h-div-w", "pn": "--pn", "model_kwargs": "--model-kwargs",
                             "vae_kwargs": "--vae-kwargs", "lvl_embed_every_chunk": "--lvl-embed-every-chunk"}
PLACEHOLDER = "<S*>"


def check_args(args: argparse.Namespace) -> None:
    """Every option and prompt checked before any work, each failure one ConfigError line: counts and the
    aspect ratio in range, no option that the mode ignores, and no `<S*>` without a personalization."""
    if args.n < 1 or args.batch_size < 1:
        raise ConfigError("--n and --batch-size must be at least 1")
    if args.h_div_w is not None and not (args.h_div_w > 0 and math.isfinite(args.h_div_w)):
        raise ConfigError(f"--h-div-w must be a finite number > 0, got {args.h_div_w}")
    if args.personalization is not None:
        given = [flag for key, flag in _FIXED_BY_PERSONALIZATION.items() if getattr(args, key) not in (None, False)]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be used with --personalization: the file decides the base "
                              "model and the resolution it was trained at; drop the option(s)")
    else:
        for i, prompt in enumerate(args.prompt, 1):
            if PLACEHOLDER in prompt:
                raise ConfigError(f"prompt {i} names {PLACEHOLDER}, but no --personalization is given (the base "
                                  f"model has no subject token): {prompt!r}")


def main(args: argparse.Namespace) -> int:
    check_args(args)
    check_output(args.out)  # before any model loads
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must end in .png, got {args.out}")
    refuse_inputs(_outputs(args.out, len(args.prompt) * args.n),
                  [args.personalization, args.model_ckpt, args.vae_ckpt, args.t5])
    # heavy imports only now: a bad output path fails before torch loads
    import torch

    from arbooth.models.sampling import check_sampling_args

    check_sampling_args(top_k=args.top_k, top_p=args.top_p, cfg=args.cfg, tau=args.tau)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.personalization is not None:
        return _generate_personalized(args, device)
    from arbooth.models import T5TextEncoder, infinity_scale_schedule, load_infinity

    if not (args.model_ckpt and args.vae_ckpt):
        raise ConfigError("pass --model-ckpt and --vae-ckpt (or --personalization)")
    cfg, tau = (4.0 if args.cfg is None else args.cfg), (0.5 if args.tau is None else args.tau)
    model_kwargs = {"lvl_embed_every_chunk": args.lvl_embed_every_chunk, **(args.model_kwargs or {})}
    model = load_infinity(args.model_ckpt, args.vae_ckpt, device=device, vae_kwargs=args.vae_kwargs or {},
                          model_kwargs=model_kwargs)
    t5 = T5TextEncoder(args.t5 or "google/flan-t5-xl", dtype="fp32" if device.type == "cpu" else "fp16", device=device)
    if t5.dim != model.text_channels:
        raise ConfigError(f"T5 width {t5.dim} does not match the model's text_channels {model.text_channels}")
    schedule = infinity_scale_schedule(1.0 if args.h_div_w is None else args.h_div_w, args.pn or "1M")

    def sample(batch: list[str], seeds: list[int]) -> torch.Tensor:
        text, mask = t5(batch)
        return model.generate(text, mask, schedule, cfg=cfg, tau=tau, top_k=args.top_k, top_p=args.top_p,
                              seed=seeds, use_cache=not args.no_cache, next_scale_mode=args.next_scale_mode,
                              dtype=args.dtype).images
    _write(_sample_all(args, sample), args.out)
    return 0


def _generate_personalized(args: argparse.Namespace, device: torch.device) -> int:
    from arbooth.subject_bases import load_sampler

    sampler = load_sampler(args.personalization, model_ckpt=args.model_ckpt, vae_ckpt=args.vae_ckpt, t5=args.t5,
                           device=device)

    def sample(batch: list[str], seeds: list[int]) -> torch.Tensor:
        return sampler.generate(batch, seed=seeds, cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p,
                                dtype=args.dtype, use_cache=not args.no_cache, next_scale_mode=args.next_scale_mode)
    _write(_sample_all(args, sample), args.out)
    return 0


def _sample_all(args: argparse.Namespace, sample) -> torch.Tensor:
    """Every image (prompts in order, --n each) in batches of --batch-size; image k from seed + k.
    `sample(prompts, seeds)` -> (B, 3, H, W) in [0, 1]."""
    import torch
    from tqdm import tqdm

    prompts = [p for p in args.prompt for _ in range(args.n)]
    images = []
    for i in tqdm(range(0, len(prompts), args.batch_size), desc="generate", unit="batch"):
        batch = prompts[i: i + args.batch_size]
        images.append(sample(batch, _seeds(args.seed, i, len(batch))).cpu())
    return torch.cat(images)


def _seeds(seed: int, start: int, n: int) -> list[int]:
    """Seeds of images start .. start + n - 1: image k always uses seed + k (batch-size independent)."""
    return [seed + start + j for j in range(n)]


def _outputs(out: Path, n_images: int) -> list[Path]:
    """The files a run writes: one image at `out`, or x_000.png ... and the grid at `out`."""
    if n_images == 1:
        return [out]
    return distinct_outputs([*(out.with_name(f"{out.stem}_{j:03d}.png") for j in range(n_images)), out])


def _write(images: torch.Tensor, out: Path) -> None:
    from arbooth.data.images import save_grid, tensor_to_pil

    files = _outputs(out, len(images))
    if len(images) == 1:
        save_image(tensor_to_pil(images[0]), out)
    else:
        for im, path in zip(images, files, strict=False):
            save_image(tensor_to_pil(im), path)
        save_grid(images, out, nrow=math.ceil(math.sqrt(len(images))))
    log.info("wrote %d image(s) to %s", len(images), out)
