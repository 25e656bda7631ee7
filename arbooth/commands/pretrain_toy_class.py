"""Pretrain the shipped tiny class-conditional VAR (tokenizer + transformer) and the toy feature extractor.

Examples:
  arbooth pretrain-toy-class                              # retrain everything into arbooth/assets/toy_class
  arbooth pretrain-toy-class out=/tmp/tc var_steps=100    # a quick try elsewhere
  arbooth pretrain-toy-class stages=[extractor]           # retrain one stage, keep the others' files

Reproducible from `seed` (same thread count). Config keys: arbooth/toy/class_pretrain.py.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML with PretrainToyClassConfig keys")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. var_steps=200")


def main(args: argparse.Namespace) -> int:
    from arbooth.config import load_config
    from arbooth.outputs import check_output
    from arbooth.toy.class_pretrain import PretrainToyClassConfig, pretrain
    cfg = load_config(PretrainToyClassConfig, args.config, list(args.overrides))
    check_output(cfg.out, folder=True, what="out")  # as pretrain-toy: a bad folder fails before any training
    out = pretrain(cfg)
    print(f"tiny class VAR and toy extractor written to {out}")
    return 0
