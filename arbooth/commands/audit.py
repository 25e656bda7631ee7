"""Membership-inference audit: a loss-threshold attack on a class-conditional fine-tune (ROC AUC, TPR at 1% FPR).

Trains on the member images with the config (DP-SGD when it has a `privacy` section; one audit per
epsilon of a sweep), or loads a finished result with --result, then scores members against held-out
non-members of the same classes. Example:
    arbooth audit --config configs/class/dp/flowers102_lora.yaml --members data/train --nonmembers data/test \\
        privacy.epsilon=1 train.out_dir=runs/audit_eps1
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="train-class YAML (with a `privacy` section for DP training)")
    parser.add_argument("--members", required=True, help="folder <class>/*.jpg the model is (or was) trained on")
    parser.add_argument("--nonmembers", required=True, help="held-out folder <class>/*.jpg, same classes")
    parser.add_argument("--result", help="audit this finished result folder instead of training")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="train.out_dir holds another run: replace it (otherwise that is refused)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. privacy.epsilon=1)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _audit_result(result_dir: Path, members: str, nonmembers: str, device: str):
    from arbooth.adapt.finetuned import load_finetuned
    from arbooth.config import from_dict
    from arbooth.privacy.audit import loss_threshold_attack, var_example_losses
    from arbooth.recipes.class_config import ClassTrainConfig

    ft = load_finetuned(result_dir, device=device)
    cfg = from_dict(ClassTrainConfig, ft.config)
    kw = {"size": cfg.data.image_size, "mid_size": cfg.mid_size, "device": device}
    classes = list(ft.classes)
    return loss_threshold_attack(var_example_losses(ft.vae, ft.var, members, classes, **kw),
                                 var_example_losses(ft.vae, ft.var, nonmembers, classes, **kw))


def main(args: argparse.Namespace) -> int:
    from arbooth.errors import ConfigError
    from arbooth.outputs import check_output, write_text

    if args.json:
        check_output(args.json)
    if args.result:
        results = {"result": _audit_result(Path(args.result), args.members, args.nonmembers, args.device)}
    else:
        if not args.config and not args.overrides:
            raise ConfigError("pass --config (to train on --members) or --result (to audit a finished run)")
        from arbooth.commands.train_class import train_class_runs
        from arbooth.recipes.class_dp_config import load_class_config

        cfg = load_class_config(args.config, args.overrides,
                                values={"data.root": str(args.members), "data.manifest": None, "data.split": ""})
        check_output(cfg.train.out_dir, folder=True, what="train.out_dir")
        finals = {r.name: r.final_dir for r in train_class_runs(cfg, overwrite=args.overwrite)}
        results = {k: _audit_result(f, args.members, args.nonmembers, args.device) for k, f in finals.items()}
    for name, res in results.items():
        print(f"{name}: {res}")
    if args.json:
        write_text(args.json, json.dumps({k: r.to_dict() for k, r in results.items()}, indent=2))
    return 0
