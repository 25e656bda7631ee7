"""Progress bars that behave in a terminal and in a log file alike.

tqdm redraws a bar every 0.1 s; written to a file (a batch job's log, `2> log.txt`) every redraw is
another line of bar text. `progress` keeps tqdm's bar in a terminal and, when stderr is not one,
redraws at most every `NON_TTY_INTERVAL` seconds (plus the last state). `TQDM_DISABLE=1` (tqdm's own
environment switch, which an explicit `disable=` would override) turns every bar off, and so does
`main=False` (ranks other than 0). Log lines reach the terminal through tqdm
(`tqdm.contrib.logging.logging_redirect_tqdm` in arbooth/cli.py), so they do not cut into a bar.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

NON_TTY_INTERVAL = 30.0   # seconds between redraws when stderr is a file or a pipe


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def progress(iterable: Iterable | None = None, *, main: bool = True, **kwargs: Any):
    """`tqdm(iterable, **kwargs)`, off on non-main ranks and under TQDM_DISABLE, rarely redrawn off a tty."""
    from tqdm.auto import tqdm

    kwargs["disable"] = kwargs.get("disable", False) or not main or _env_true("TQDM_DISABLE")
    if not sys.stderr.isatty() and "TQDM_MININTERVAL" not in os.environ:
        kwargs.setdefault("mininterval", NON_TTY_INTERVAL)
        kwargs.setdefault("maxinterval", NON_TTY_INTERVAL * 4)
        kwargs["dynamic_ncols"] = False
    return tqdm(iterable, **kwargs)
