"""Fine-tune a released VAR on a class-labelled image dataset (FFT, LoRA or LNTuning).

With no --config, --data or --manifest it runs the built-in main job (arbooth/jobs/toy_class.py):
LoRA on the shipped tiny VAR over a downstream toy dataset it never saw, FID before and after with the
toy extractor, runs/toy_class/metrics.json and runs/toy_class/grid.png (a few minutes on 2 CPU cores).

Examples:
  arbooth train-class                                       # the built-in toy main job
  arbooth train-class method.name=fft                       # ... with full fine-tuning
  arbooth train-class --config configs/class/flowers102_lora_d16.yaml --data /data/flowers102 \\
      --vae-ckpt vae_ch160v4096z32.pth --var-ckpt var_d16.pth
  accelerate launch --num_processes 4 -m arbooth.cli train-class --config ... train.batch_size=16
  arbooth train-class --config ... --resume auto            # continue the newest checkpoint of out_dir
  arbooth train-class --config ... --overwrite              # out_dir holds another run: replace it
  arbooth train-class --config configs/class/dp/flowers102_lora.yaml --data ... privacy.epsilon=10   # DP-SGD
Any config field can be overridden as key=value (e.g. optim.lr=2.0e-4 method.name=lntuning).
A config with a `privacy` section trains with DP-SGD (arbooth/recipes/train_class_dp.py; docs/privacy.md).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from arbooth.errors import ConfigError
from arbooth.outputs import check_output, refuse_nested


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/class/*.yaml); defaults apply without it")
    parser.add_argument("--data", help="image folder root/<class>/*.jpg (or root/train/<class>/...)")
    parser.add_argument("--manifest", help="CSV/JSONL manifest of path,label instead of --data")
    parser.add_argument("--vae-ckpt", help="official vae_ch160v4096z32.pth")
    parser.add_argument("--var-ckpt", help="official var_d{depth}.pth")
    parser.add_argument("--out-dir", help="where checkpoints, samples and the final result go")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                        help="a checkpoint folder, or 'auto' (also with no value) for the newest one of the run in out_dir "
                        "(a fresh start when out_dir holds no run); the config may differ only in the safe "
                        "keys listed in README 'Run folders and resume'")
    parser.add_argument("--overwrite", action="store_true",
                        help="out_dir holds another run: delete its checkpoints, results and logs and start anew")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


@dataclass
class ClassRunResult:
    """One finished class-conditional run: `name` is "non-private" or "epsilon=<target>", `final_dir` the
    result folder `load_finetuned` reads, `summary` the one line `train-class` prints (None on ranks
    other than 0, or when nothing ran this session)."""

    name: str
    final_dir: Path
    summary: str | None
    run: Any


def train_class_runs(cfg, *, resume: str | None = None, overwrite: bool = False) -> list[ClassRunResult]:
    """The DP/non-DP dispatch of `train-class` and `audit`: a `ClassDPConfig` (a config with a
    `privacy` section) trains with DP-SGD, once per target epsilon of a sweep; a `ClassTrainConfig`
    with the non-private recipe. `resume` / `overwrite`: see README "Run folders and resume"."""
    from arbooth.recipes import train_class, train_class_dp

    if isinstance(cfg, train_class_dp.ClassDPConfig):
        results = []
        for run in train_class_dp.train(cfg, resume=resume, overwrite=overwrite):
            summary = None
            if run.accelerator.is_main_process:
                r = train_class_dp.privacy_report(run)
                summary = (f"done: epsilon {r['epsilon_spent']:.4f} of {r['target_epsilon']:g} "
                           f"(delta {r['delta']:.3g}), {r['steps']} steps")
            results.append(ClassRunResult(f"epsilon={run.epsilon:g}", cfg.run_dir(run.epsilon) / "final",
                                          summary, run))
        return results
    run = train_class.train(cfg, resume=resume, overwrite=overwrite)
    summary = None
    if run.accelerator.is_main_process and run.history:
        last = run.history[-1]
        summary = (f"done: {len(run.history)} steps this session, loss {last['loss']:.4f}, "
                   f"acc {last['acc']:.2f}%; result in {cfg.train.out_dir}")
    return [ClassRunResult("non-private", Path(cfg.train.out_dir) / "final", summary, run)]


def main(args: argparse.Namespace) -> int:
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: argparse gives the override to --resume (its value is optional)
        args.overrides, args.resume = [args.resume, *args.overrides], "auto"
    if args.config is None and args.data is None and args.manifest is None:
        return _toy_main(args)
    from arbooth.recipes.class_dp_config import load_class_config

    cfg = load_class_config(args.config, args.overrides)
    # paths replace the config's after parsing, so no path is ever read as a YAML scalar
    cfg = replace(cfg, data=replace(cfg.data, root=args.data or cfg.data.root,
                                    manifest=args.manifest or cfg.data.manifest),
                  model=replace(cfg.model, vae_ckpt=args.vae_ckpt or cfg.model.vae_ckpt,
                                var_ckpt=args.var_ckpt or cfg.model.var_ckpt),
                  train=replace(cfg.train, out_dir=args.out_dir or cfg.train.out_dir))
    # before any model or data loads: the run folder can be written and is not the data's own folder
    check_output(cfg.train.out_dir, folder=True, what="train.out_dir")
    refuse_nested(cfg.train.out_dir, cfg.data.root, what="data")
    for result in train_class_runs(cfg, resume=args.resume, overwrite=args.overwrite):
        if result.summary:
            print(result.summary)
    return 0


def _toy_main(args: argparse.Namespace) -> int:

    import torch

    from arbooth.jobs.toy_class import DEFAULT_OUT, run_default

    if args.resume or args.vae_ckpt or args.var_ckpt:
        raise ConfigError("the built-in toy job takes no --resume / --vae-ckpt / --var-ckpt; pass --config and "
                          "--data to fine-tune your own VAR")
    torch.set_num_threads(1)  # tiny matmuls: on a busy 2-core machine a second OpenMP thread costs more than it gives
    out = args.out_dir or DEFAULT_OUT
    print(f"no --config/--data: the built-in toy job (LoRA on the shipped tiny VAR, a downstream toy dataset) "
          f"into {out}")
    m = run_default(out, overrides=args.overrides)
    print(f"done in {m['total_seconds']:.0f}s: {m['method']} ({m['trainable_params']:,} trainable parameters), "
          f"toy FID {m['fid_before']:.2f} -> {m['fid_after']:.2f}, precision {m['precision']:.3f}, "
          f"recall {m['recall']:.3f}\n  {out}/metrics.json\n  {m['grid']}")
    return 0
