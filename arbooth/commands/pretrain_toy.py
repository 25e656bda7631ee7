"""Pretrain the shipped toy base (tiny BSQ-VAE, T5, Infinity) and toy evaluators (tiny CLIP, attribute probe).

Examples:
  arbooth pretrain-toy                                  # retrain everything into arbooth/assets/toy
  arbooth pretrain-toy out=/tmp/toy model_steps=200     # a quick try elsewhere
  arbooth pretrain-toy stages=[clip,probe]              # retrain some stages, keep the others' files

Reproducible from `seed` (same thread count). Config keys: arbooth/toy/pretrain.py PretrainToyConfig.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML with PretrainToyConfig keys")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model_steps=200")


def main(args: argparse.Namespace) -> int:
    from arbooth.config import load_config
    from arbooth.outputs import check_output
    from arbooth.toy.pretrain import PretrainToyConfig, pretrain
    cfg = load_config(PretrainToyConfig, args.config, list(args.overrides))
    check_output(cfg.out, folder=True, what="out")
    out = pretrain(cfg)
    print(f"toy base written to {out}")
    return 0
