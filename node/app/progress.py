"""The progress bar of ``srnode process``: one tqdm bar per series, its steps the pipeline's stages.

Shown only on a terminal (stderr a TTY) and without ``--quiet``; otherwise silent, so logs and pipes carry only
the one result line per series. Log records written while a bar is up go through tqdm (they do not break it).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_RUN = re.compile(r"^run (\d+)/(\d+) ")


def wanted(quiet: bool, stream: TextIO = sys.stderr) -> bool:
    """Whether to show a bar: not ``--quiet`` and ``stream`` is a terminal."""
    try:
        return not quiet and stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class SeriesBar:
    """Stages of one series: reading, then per run (irregular series have several) engine and deriving, then done.

    ``stage(msg)`` takes the pipeline's progress messages (``node.process.process_series``'s ``progress``).
    """

    def __init__(self, title: str, enabled: bool) -> None:
        self.bar: tqdm[None] | None = None
        if enabled:
            sized = _columns(sys.stderr) > 0  # a terminal that reports no size (0x0) gets 80x24
            self.bar = tqdm(total=3, desc=title, unit="stage", leave=False, file=sys.stderr,
                            dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24,
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt} stages [{elapsed}]{postfix}")
            self.bar.set_postfix_str("reading", refresh=True)

    def stage(self, msg: str) -> None:
        if self.bar is None:
            return
        m = _RUN.match(msg)
        if m and self.bar.total != 1 + 2 * int(m.group(2)):
            self.bar.total = 1 + 2 * int(m.group(2))  # reading + (engine, deriving) per run
        self.bar.update(1)
        self.bar.set_postfix_str(msg, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total or self.bar.n
            self.bar.set_postfix_str("done", refresh=True)
            self.bar.close()


@contextlib.contextmanager
def logs_through_bars(enabled: bool) -> Iterator[None]:
    """While bars are shown, log records are written above them (tqdm.write) instead of through them."""
    if not enabled:
        yield
        return
    with logging_redirect_tqdm():
        yield
