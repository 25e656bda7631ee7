"""Write the class-conditional toy datasets as ordinary image folders (root/{train,test}/<class>/*.png).

Examples:
  arbooth toy-data --out data/toy                         # every downstream world: data/toy/<world>/
  arbooth toy-data --world new_textures --out data/toy --train-per-class 200
  arbooth toy-data --world source --out data/toy          # the classes the tiny VAR was pretrained on

Worlds (arbooth/toy/class_world.py): source (circle, diamond, square, star, triangle: what the shipped
tiny VAR saw), new_shapes (arrow, cross, heart) and new_textures (checkered triangle, dotted square,
striped circle), neither seen in pretraining. Fine-tune on one with
  arbooth train-class --config <yaml> --data data/toy/new_shapes ...   (or `arbooth train-class` alone)
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/toy", help="parent folder; each world goes to <out>/<world>")
    parser.add_argument("--world", action="append", help="world name (repeatable); default: every downstream world")
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--test-per-class", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from arbooth.errors import ConfigError
    from arbooth.toy.class_world import DOWNSTREAM, world_by_name, write_class_dataset

    if args.train_per_class < 1 or args.test_per_class < 1:
        raise ConfigError("--train-per-class and --test-per-class must be >= 1")
    for name in args.world or list(DOWNSTREAM):
        world = world_by_name(name)
        root = write_class_dataset(Path(args.out) / name, world, train_per_class=args.train_per_class,
                                   test_per_class=args.test_per_class, seed=args.seed)
        print(f"{name}: {len(world.classes)} classes ({', '.join(world.class_names)}), "
              f"{args.train_per_class} train + {args.test_per_class} test images each -> {root}")
    return 0
