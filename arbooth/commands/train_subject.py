"""Personalize Infinity on photos of one subject (ARBooth): writes a small personalization file.

Examples:
  arbooth train-subject --subject subjects/my_dog --class-noun dog \\
      --model-ckpt weights/infinity_2b_reg.pth --vae-ckpt weights/infinity_vae_d32_reg.pth --t5 weights/flan-t5-xl
  arbooth train-subject --tiny --subject ../shared/vico/brown_dog --class-noun dog steps=5 out_dir=runs/try

With no arguments at all it runs the built-in toy default (configs/subject/toy.yaml on the shipped toy
base, docs/toy.md); another subject on the toy base: `--config configs/subject/toy.yaml --subject DIR`.
As soon as a subject or checkpoint is given, the defaults are configs/subject/infinity_2b.yaml
(the authors' settings: 500 steps at batch 2,
lr 2.34375e-5, AdamW with weight decay 0.005, 1024x1024, cross-attention + FFN + <S*> trained,
prior distillation with reg_lambda 0.5). Any config key can be overridden as key=value, e.g.
`steps=150 batch_size=1 tuning.self_attention=true loss.distill_type=hard teacher.mode=arbooth_compat`;
`tuning.method=lora` trains LoRA adapters (rank 16) instead of the layers: a ~38 MB file at 2B instead of
~3 GB (docs/arbooth.md); `teacher.bank_size=16` draws the teacher's class samples once.
Outputs in out_dir (--out-dir): personalization.safetensors (tuning.method=lora: a peft adapter folder
personalization/), val/step_*.png grids, metrics.jsonl, README.md (model card), config.yaml, run.json,
train_state.pt (`--resume auto` or resume=true continues from it; `--overwrite` replaces another run).
`log.report_to=tensorboard|wandb|all` logs through accelerate's trackers. Use the result with
`arbooth generate --personalization out_dir/personalization.safetensors --prompt "a <S*> dog ..."`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "subject" / "infinity_2b.yaml"
TOY_CONFIG = DEFAULT_CONFIG.with_name("toy.yaml")  # no subject given: the built-in toy default (docs/toy.md)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject", help="folder with 3-6 photos of the subject (and optional subject.yaml)")
    parser.add_argument("--class-noun", help="class word of the subject, e.g. dog (else from subject.yaml)")
    parser.add_argument("--model-ckpt", help="Infinity-2B checkpoint (infinity_2b_reg.pth)")
    parser.add_argument("--vae-ckpt", help="BSQ-VAE checkpoint (infinity_vae_d32_reg.pth)")
    parser.add_argument("--t5", help="flan-t5-xl folder (tokenizer + encoder)")
    parser.add_argument("--out-dir", "--out", dest="out", help="the run folder (out_dir); default runs/subject")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                        help="continue the run in out_dir ('auto', also with no value: a fresh start when out_dir "
                        "holds no run), or in the run folder PATH (its train_state.pt); same as resume=true")
    parser.add_argument("--overwrite", action="store_true",
                        help="out_dir holds another run: delete its outputs and start anew (overwrite=true)")
    parser.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.name} when it exists)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random model, no checkpoints: tries the whole recipe on the CPU in seconds")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=150")


def build_config(args: argparse.Namespace):
    from arbooth.config import load_config
    from arbooth.errors import ConfigError
    from arbooth.recipes.subject_config import SubjectTrainConfig
    overrides = []
    if args.tiny:  # small, fast and fp32: the CPU has no fast bf16
        overrides += ["model.preset=tiny", "model.pn=0.06M", "model.tuned_dtype=fp32", "dtype=fp32", "device=cpu",
                      "steps=4", "batch_size=1", "validate_every=2", "save_every=0"]
    for flag, key in (("subject", "subject"), ("class_noun", "class_noun"), ("model_ckpt", "model.model_ckpt"),
                      ("vae_ckpt", "model.vae_ckpt"), ("t5", "model.t5"), ("out", "out_dir")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    _resume_value_is_override(args)
    if args.resume is not None:
        if args.resume != "auto":  # a run folder (or the train_state.pt in it): that is out_dir
            folder = Path(args.resume)
            folder = folder.parent if folder.name == "train_state.pt" else folder
            if args.out is not None and Path(args.out).resolve() != folder.resolve():
                raise ConfigError(f"--resume {args.resume} and --out-dir {args.out} name two run folders; give one")
            overrides.append(f"out_dir={folder}")
        overrides.append("resume=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    config = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if _toy_default(args):
        config = TOY_CONFIG
        if not Path("subjects/toy_star").is_dir():  # run from elsewhere than the repo root
            overrides.append(f"subject={TOY_CONFIG.parents[2] / 'subjects' / 'toy_star'}")
    # values from the command line are strings: quote them so YAML keeps them strings
    quoted = [o if o.split("=", 1)[0] not in ("subject", "class_noun", "model.model_ckpt", "model.vae_ckpt",
                                              "model.t5", "out_dir") else f"{o.split('=', 1)[0]}={_yaml_str(o)}"
              for o in overrides + list(args.overrides)]
    return load_config(SubjectTrainConfig, config, quoted)


def _resume_value_is_override(args: argparse.Namespace) -> None:
    """`--resume steps=3`: argparse gives the override to --resume (its value is optional); it is an override."""
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        args.overrides = [args.resume, *args.overrides]
        args.resume = "auto"


def _toy_default(args: argparse.Namespace) -> bool:
    """No subject, config, checkpoint or --tiny: the built-in toy default."""
    given = [args.subject, args.config, args.model_ckpt, args.vae_ckpt, args.t5]
    return all(v is None for v in given) and not args.tiny and \
        not any(o.startswith(("subject=", "model.preset=")) for o in args.overrides)


def _yaml_str(override: str) -> str:
    import json
    return json.dumps(override.split("=", 1)[1])


def main(args: argparse.Namespace) -> int:
    from arbooth.outputs import check_output, refuse_nested
    from arbooth.recipes.train_subject import train
    from arbooth.subject_bases import SUBJECT_PRESETS
    cfg = build_config(args)
    # before any model loads: the run folder can be written and is not the subject's photo folder
    check_output(cfg.out_dir, folder=True, what="out_dir")
    refuse_nested(cfg.out_dir, cfg.subject or None, what="subject")
    preset = SUBJECT_PRESETS[cfg.model.preset]
    if preset.num_threads:
        import torch
        torch.set_num_threads(preset.num_threads)
    path = train(cfg)
    print(f"personalization: {path}")
    if preset.report is not None:  # e.g. the toy base's evaluators: base-vs-personalized grid and metrics
        for line in preset.report(cfg, path):
            print(line)
        _card_with_report(cfg, path)
    return 0


def _card_with_report(cfg, path) -> None:
    """Rewrite the run's model card with the report's grid and mean metrics (the toy base's report)."""
    import json

    from arbooth.adapt.personalization import load_personalization
    from arbooth.recipes.train_subject import write_subject_card

    out = Path(cfg.out_dir)
    if not (out / "metrics.json").is_file():
        return
    pers = load_personalization(path)
    mean = json.loads((out / "metrics.json").read_text())["personalized"]["mean"]
    write_subject_card(cfg, Path(path), base_id=pers.metadata.get("base_model", cfg.model.preset),
                       base_sha256=pers.metadata["base_tuned_sha256"], class_noun=pers.metadata.get("class_noun", ""),
                       grid=out / "grid.png" if (out / "grid.png").is_file() else None, metrics=mean)
