"""`arbooth <command> ...`: one entry point; each command lives in its own module.

A command module defines `add_arguments(parser)` and `main(args) -> int | None`, and a module
docstring whose first line becomes the command's help. Every command module is imported to build the
parser for `--help`; a command line that names a command imports only that command's module, and
sample/generate import torch only after their output checks, so a bad output fails at once (0.1-0.2 s)
instead of after torch loads. An `ArboothError` (bad config value, missing checkpoint, unreadable
image) is printed as one line and exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from arbooth.errors import ArboothError

COMMANDS = {
    "sample": "arbooth.commands.sample",
    "generate": "arbooth.commands.generate",
    "train-class": "arbooth.commands.train_class",
    "export": "arbooth.commands.export",
    "profile": "arbooth.commands.profile",
    "audit": "arbooth.commands.audit",
    "train-subject": "arbooth.commands.train_subject",
    "eval-subject": "arbooth.commands.eval_subject",
    "bench-subject": "arbooth.commands.bench_subject",
    "eval-class": "arbooth.commands.eval_class",
    "pretrain-toy": "arbooth.commands.pretrain_toy",
    "pretrain-toy-class": "arbooth.commands.pretrain_toy_class",
    "toy-data": "arbooth.commands.toy_data",
}


def _available_commands() -> dict[str, str]:
    return {name: mod for name, mod in COMMANDS.items() if importlib.util.find_spec(mod) is not None}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `only` (imports just that command module, so a command's checks
    of its arguments and outputs run before torch is imported by the other commands' modules)."""
    parser = argparse.ArgumentParser(
        prog="arbooth",
        description="Adapt visual autoregressive image generators (VAR, Infinity). "
        "Run `arbooth <command> --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, mod_name in _available_commands().items():
        if only is not None and name != only:
            continue
        mod = importlib.import_module(mod_name)
        doc = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
        # argparse %-formats help strings (not descriptions): a literal "1%" in a docstring must be escaped
        p = sub.add_parser(name, help=doc.replace("%", "%%"), description=(mod.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except ArboothError as e:
        print(f"arbooth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
