"""Benchmark subject personalization: train, sample and score every subject of a benchmark (the ARBooth ViCo table).

  arbooth bench-subject                                   # the built-in toy benchmark (~2.5 min on 2 CPU cores)
  arbooth bench-subject --benchmark ../shared/vico --model-ckpt ... --vae-ckpt ... --t5 ... \\
      --variant full --variant lora:tuning.method=lora    # two recipes in one table
  torchrun --nproc_per_node 8 -m arbooth.cli bench-subject --benchmark ...   # subjects split over 8 GPUs

--benchmark is a folder in the ViCo/DreamBench layout: one sub-folder of photos per subject,
prompts_live_objects.txt and prompts_nonlive_objects.txt (`{}` = the subject phrase); class noun and
live-ness from each subject.yaml (`class_noun`, `kind: live|object`), --class-noun / --live, or the ViCo
concepts table. Without it, the toy benchmark (four split-star subjects the toy base never saw, with
their oracle) is written into <out>/toy_benchmark and run. For every variant and subject the subject
recipe trains (--config + key=value overrides, then the variant's), the personalized model samples
--images-per-prompt images per prompt (image i from --seed + i) and --pres-samples class-prompt images,
and the protocol scores them; per prompt -> per subject -> overall (and live / object), with training
time per subject, sampling time per image, and each variant's paired difference to the first across
subjects. Writes <out>/report.json, report.md, report.html (self-contained) and a model card. Reruns
reuse what was already trained and sampled with the same settings (--overwrite redoes what differs).
"""
from __future__ import annotations

import argparse

from arbooth.metrics.extractors import DEFAULT
from arbooth.metrics.subject import PROTOCOLS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", default=None, help="benchmark folder (ViCo layout); default: the toy benchmark")
    p.add_argument("--out", default="runs/bench_subject", help="output folder (default: runs/bench_subject)")
    p.add_argument("--config", default=None,
                   help="subject recipe config (default: configs/subject/toy.yaml for the toy, infinity_2b.yaml else)")
    p.add_argument("--model-ckpt", help="base checkpoint (model.model_ckpt)")
    p.add_argument("--vae-ckpt", help="BSQ-VAE checkpoint (model.vae_ckpt)")
    p.add_argument("--t5", help="flan-t5-xl folder (model.t5)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE ...]",
                   help="a named recipe variant, e.g. 'lora:tuning.method=lora' (repeat; the first is the reference "
                        "of the paired differences; default: toy full and lora, else full)")
    p.add_argument("--subjects", nargs="+", default=[], help="only these subjects")
    p.add_argument("--live", nargs="*", default=None, help="the live subjects (the others are objects)")
    p.add_argument("--class-noun", action="append", default=[], metavar="SUBJECT=NOUN", help="a subject's class noun")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default: toy 4, else 8 (the ViCo table)")
    p.add_argument("--prompts-per-subject", type=int, default=None, help="only the first K prompts (quick runs)")
    p.add_argument("--pres-samples", type=int, default=None, help="class-prompt images for PRES (toy 16, else 100)")
    p.add_argument("--class-prompt", default=None, help="default: toy 'a {}', else 'a photo of {}' (the authors')")
    p.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i (as ARBooth)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="dreammatcher")
    p.add_argument("--cfg", type=float, default=None, help="guidance (default: each run's val_cfg)")
    p.add_argument("--tau", type=float, default=None, help="temperature (default: each run's val_tau)")
    p.add_argument("--top-k", type=int, default=None, help="default: toy 0 (off), else 900")
    p.add_argument("--top-p", type=float, default=None, help="default: toy 0 (off), else 0.97")
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="sampling and scoring device (auto: this rank's GPU, else cpu)")
    p.add_argument("--dino-weights", default=DEFAULT)
    p.add_argument("--clip-weights", default=DEFAULT)
    p.add_argument("--lpips-backbone", default=DEFAULT)
    p.add_argument("--random-weights", action="store_true", help="random-weight extractors (smoke test)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain / resample what was made with other settings instead of refusing")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples of the paired differences")
    p.add_argument("--thumb", type=int, default=96, help="image size on the HTML page (px)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="subject-recipe overrides for every variant")


def main(args: argparse.Namespace) -> int:
    import json

    from arbooth.bench.plan import BenchConfig, Variant
    from arbooth.bench.subject import run_bench
    from arbooth.metrics.report import markdown_table

    paths = [f"model.{k}={json.dumps(v)}" for k, v in (("model_ckpt", args.model_ckpt), ("vae_ckpt", args.vae_ckpt),
                                                        ("t5", args.t5)) if v is not None]
    opts = BenchConfig(
        benchmark=args.benchmark, out=args.out, config=args.config, overrides=(*paths, *args.overrides),
        variants=tuple(Variant.parse(v) for v in args.variant), subjects=tuple(args.subjects),
        live=None if args.live is None else tuple(args.live), class_nouns=tuple(args.class_noun),
        images_per_prompt=args.images_per_prompt, prompts_per_subject=args.prompts_per_subject,
        pres_samples=args.pres_samples, class_prompt=args.class_prompt, seed=args.seed, protocol=args.protocol,
        cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p, gen_batch_size=args.gen_batch_size,
        eval_batch_size=args.eval_batch_size, device=args.device, dino_weights=args.dino_weights,
        clip_weights=args.clip_weights, lpips_backbone=args.lpips_backbone, random_weights=args.random_weights,
        overwrite=args.overwrite, n_boot=args.n_boot, thumb=args.thumb)
    report = run_bench(opts)
    if report is not None:
        from arbooth.bench.report import _columns, _overall_rows
        print(markdown_table(_overall_rows(report), ["variant", "group", "subjects", *_columns(report), "train_s",
                                                     "sample_s_per_image"]))
        print(f"\nwrote {args.out}/report.json, report.md, report.html ({report['wall_s']:.0f} s)")
    return 0
