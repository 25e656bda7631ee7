"""Count the training cost of a class-conditional fine-tuning run, per method (the paper's Figure 1).

FLOPs of one training micro-step (transformer forward + backward, `torch.utils.flop_counter`) times the
micro-steps of the whole run = PFLOPs of the run. With `--device fake` (the default without a GPU) the
step runs on fake tensors (shapes only: any size, no memory, no time); on CUDA the step is also timed
and its peak memory read.
The frozen tokenizer's encoding is the same for every method and reported separately.

Example:
  arbooth profile --config configs/class/flowers102_lora_d16.yaml --num-images 1020 --methods fft lora lntuning
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from arbooth.config import load_config
from arbooth.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/class/*.yaml)")
    parser.add_argument("--num-images", type=int, help="training images (or pass --data to count them)")
    parser.add_argument("--data", help="image folder to count the training images of")
    parser.add_argument("--methods", nargs="+", help="methods to compare (default: the config's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "fake",
                        help="fake: FLOPs only (any size, no memory); cuda: also time and peak memory")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def profile_step(cfg, method: str, *, device: str = "fake", timed_steps: int = 3) -> dict[str, float | None]:
    """FLOPs of one micro-step (batch `train.batch_size`) of `method`; time and peak memory on CUDA. The
    model is built as the recipe builds it (`build_vae_var`), `model.gradient_checkpointing` included:
    a checkpointed step counts the blocks' forward again in backward."""
    from arbooth.adapt.finetuned import build_vae_var
    from arbooth.adapt.methods import prepare_for_method

    fake = device == "fake"
    mcfg = replace(cfg.model, vae_ckpt=None, var_ckpt=None)  # weights do not change the cost
    _, var = build_vae_var(mcfg, device="meta" if fake else device)
    model = prepare_for_method(var, method, lora_rank=cfg.method.lora_rank, lora_alpha=cfg.method.alpha)
    if not fake:
        return _profile_step(cfg, model, var, device, timed_steps)
    # Fake tensors carry shapes and dtypes only, so a d30 step is counted on a laptop. The model is
    # built on `meta` (no init work) and given fake CPU storage, as autocast has no `meta` device type.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        return _profile_step(cfg, model, var, "cpu", 0)


def _profile_step(cfg, model, var, device: str, timed_steps: int) -> dict[str, float | None]:
    from arbooth.adapt.methods import count_parameters
    from arbooth.models.var_training import build_optimizer, var_loss
    from arbooth.precision import autocast

    model.train()
    B, dev = cfg.train.batch_size, torch.device(device)
    labels_B = torch.randint(0, var.num_classes, (B,), device=dev)
    x_BLCv = torch.randn(B, var.L - var.first_l, var.Cvae, device=dev)
    idx_BL = torch.randint(0, var.V, (B, var.L), device=dev)
    precision = cfg.train.precision if dev.type == "cuda" else "fp32"

    def step() -> None:
        with autocast(precision, dev):
            logits_BLV = model(labels_B, x_BLCv)
        var_loss(logits_BLV, idx_BL).backward()

    with FlopCounterMode(display=False) as fwd, torch.no_grad(), autocast(precision, dev):
        model(labels_B, x_BLCv)
    with FlopCounterMode(display=False) as both:
        step()
    out: dict[str, float | None] = {"trainable_params": count_parameters(model).trainable,
                                    "flops_forward": fwd.get_total_flops(), "flops_step": both.get_total_flops(),
                                    "step_s": None, "peak_mem_gib": None}
    if dev.type == "cuda" and timed_steps > 0:
        opt = build_optimizer(model, cfg.optim)
        step(), opt.step(), opt.zero_grad(set_to_none=True)  # warm-up, optimizer state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(timed_steps):
            step(), opt.step(), opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out["step_s"] = (time.perf_counter() - t0) / timed_steps
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(args: argparse.Namespace) -> int:
    from arbooth.data.class_dataset import scan_image_folder
    from arbooth.outputs import check_output, write_text
    from arbooth.recipes.class_config import ClassTrainConfig

    cfg = load_config(ClassTrainConfig, args.config, args.overrides)
    if args.json:
        check_output(args.json)
    if args.data:
        n = len(scan_image_folder(args.data, cfg.data.split)[0])
    elif args.num_images:
        n = args.num_images
    else:
        raise ConfigError("pass --num-images N or --data <folder> (the run's cost scales with the data)")
    micro_per_epoch = n // cfg.train.batch_size
    accum = cfg.train.accum_steps(1)
    micro_steps = cfg.total_steps(micro_per_epoch) * accum
    rows = {}
    print(f"d{cfg.model.depth}, batch {cfg.train.batch_size} x accum {accum} (1 process), {n} images, "
          f"{cfg.train.epochs:g} epochs = {micro_steps} micro-steps; device {args.device}")
    print(f"{'method':<10} {'trainable':>11} {'GFLOP fwd':>10} {'GFLOP step':>11} {'run PFLOP':>10} "
          f"{'step s':>7} {'peak GiB':>8}")
    for method in args.methods or [cfg.method.name]:
        r = profile_step(cfg, method, device=args.device)
        r["run_pflops"] = r["flops_step"] * micro_steps / 1e15
        rows[method] = r
        print(f"{method:<10} {r['trainable_params'] / 1e6:>10.2f}M {r['flops_forward'] / 1e9:>10.1f} "
              f"{r['flops_step'] / 1e9:>11.1f} {r['run_pflops']:>10.2f} {_fmt(r['step_s'], '7.3f'):>7} "
              f"{_fmt(r['peak_mem_gib'], '8.2f'):>8}")
    if args.json:
        write_text(args.json, json.dumps({"micro_steps": micro_steps, "num_images": n, "methods": rows}, indent=2))
    if not math.isfinite(sum(r["run_pflops"] for r in rows.values())):
        raise ConfigError("FLOP count failed")
    return 0
