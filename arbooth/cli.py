"""`arbooth <command> ...`: one entry point; each command lives in its own module.

A command module defines `add_arguments(parser)` and `main(args) -> int | None`, and a module
docstring whose first line becomes the command's help. `arbooth --help` reads those first lines from
the modules' source (no module is imported, so neither is torch); a command line that names a command
imports only that command's module, and sample/generate import torch only after their output checks,
so a bad output fails at once (0.1-0.2 s) instead of after torch loads. An `ArboothError` (bad config
value, missing checkpoint, unreadable image) is printed as one line and exit status 2, without a
traceback.

Logging: arbooth's own loggers at INFO (`-v`: DEBUG, `-q`: WARNING, or `--log-level LEVEL`), every
other library's at WARNING whatever the flags; log lines go through tqdm
(`tqdm.contrib.logging.logging_redirect_tqdm`), so they never land inside a progress bar.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _available_commands() -> dict[str, str]:
    return {name: mod for name, mod in COMMANDS.items() if importlib.util.find_spec(mod) is not None}


def _summary(mod_name: str) -> str:
    """The first line of a command module's docstring, read from its source without importing it."""
    origin = importlib.util.find_spec(mod_name).origin
    doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _add_log_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug lines from arbooth's own loggers (other libraries stay at warnings)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="warnings and errors only")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
                        help="level of arbooth's loggers (default INFO; -v = DEBUG, -q = WARNING)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (their one-line help only, no module imported), or the full parser of
    `only` (imports just that command module, so a command's checks of its arguments and outputs run
    before torch is imported by the other commands' modules)."""
    parser = argparse.ArgumentParser(
        prog="arbooth",
        description="Adapt visual autoregressive image generators (VAR, Infinity). "
        "Run `arbooth <command> --help` for a command's options.",
    )
    _add_log_options(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, mod_name in _available_commands().items():
        if only is not None and name != only:
            continue
        if only is None:  # the command list: one-line help from the source
            p = sub.add_parser(name, help=_summary(mod_name).replace("%", "%%"))
            p.set_defaults(_module_name=mod_name)
            continue
        mod = importlib.import_module(mod_name)
        doc = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
        # argparse %-formats help strings (not descriptions): a literal "1%" in a docstring must be escaped
        p = sub.add_parser(name, help=doc.replace("%", "%%"), description=(mod.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_log_options(p, argparse.SUPPRESS)  # also after the command: `arbooth train-subject -v`
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _command_name(argv: list[str]) -> str | None:
    """The command word of `argv` (after any global options), if it names one."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--log-level":
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a if a in COMMANDS else None
    return None


def setup_logging(args: argparse.Namespace) -> None:
    """Other libraries at WARNING; arbooth's loggers at the level the flags ask for."""
    level = args.log_level or ("DEBUG" if args.verbose else "WARNING" if args.quiet else "INFO")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("arbooth").setLevel(level)


def _through_tqdm():
    """Route the console log handler through tqdm.write while a command runs (so a log line never lands
    inside a progress bar); a no-op when the root logger has no console handler (e.g. under pytest)."""
    import contextlib

    console = [h for h in logging.getLogger().handlers
               if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]
    if not console:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_name(argv))
    args = parser.parse_args(argv)
    setup_logging(args)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _through_tqdm():
            return int(args._module.main(args) or 0)
    except ArboothError as e:
        print(f"arbooth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
