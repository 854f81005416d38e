"""Progress bars of the long commands: ``srnode process`` (one bar per series, its steps the pipeline's stages),
``srnode eval``, ``srnode train`` and ``srnode bench ...`` (``StageBar``: named stages), each with a second bar
under it for the engine's own long stages (fine-tuning steps with their loss, network passes: ``EngineBar``, fed
by ``models.engine.Progress``) showing the stage name, count, rate and ETA.

Shown only on a terminal (stderr a TTY) and without ``--quiet``; otherwise silent, so logs and pipes carry only
the result lines. Log records written while a bar is up go through tqdm (they do not break it).
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


def wanted(quiet: bool, stream: TextIO | None = None) -> bool:
    """Whether to show a bar: not ``--quiet`` and ``stream`` (default: the current ``sys.stderr``) is a terminal."""
    try:
        return not quiet and (stream or sys.stderr).isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _bar(enabled: bool, total: int | None, desc: str, position: int | None, bar_format: str, unit: str = "it"
         ) -> tqdm[None] | None:
    """A tqdm bar on stderr (None when not enabled) at ``position`` (None: tqdm's next free line); a terminal
    that reports no size (0x0) gets 80x24. The one place every bar of this module is built."""
    if not enabled:
        return None
    sized = _columns(sys.stderr) > 0
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, position=position,
                dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24,
                bar_format=bar_format, mininterval=0.2)


class EngineBar:
    """The engine's long stages (``models.engine.Progress``): a bar per stage, its name, count, rate and ETA,
    the training loss as postfix. Callable, so it is itself the engine's ``progress``."""

    FORMAT = "  {desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"

    def __init__(self, enabled: bool, position: int = 1) -> None:
        self.enabled = enabled
        self.position = position
        self.bar: tqdm[None] | None = None
        self.name = ""

    def __call__(self, stage: str, done: int, total: int, loss: float | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is None or stage != self.name:
            if self.bar is not None:
                self.bar.close()
            self.name = stage
            self.bar = _bar(True, total, stage, self.position, self.FORMAT)
        assert self.bar is not None
        if self.bar.total != total:
            self.bar.total = total
        if loss is not None:  # before the update, whose refresh then shows it
            self.bar.set_postfix_str(f"loss {loss:.4g}", refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.refresh()  # the last step is always drawn (update refreshes at most every mininterval)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.name = ""


def _finish(bar: tqdm[None]) -> None:
    """Draw ``bar`` full with "done" as postfix, then close it (a stage or series bar at its end)."""
    bar.n = bar.total or bar.n
    bar.set_postfix_str("done", refresh=True)
    bar.close()


class StageBar:
    """Named stages of one command (``srnode eval``: engine, baselines, metrics; ``srnode bench``: its runs) with
    elapsed time and ETA, and an ``EngineBar`` (``.engine``) under it. ``stage(name)`` starts the next stage."""

    def __init__(self, title: str, total: int, enabled: bool) -> None:
        self.bar = _bar(enabled, total, title, 0,
                        "{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}", unit="stage")
        self.engine = EngineBar(enabled)
        self._started = False

    def stage(self, name: str, total: int | None = None) -> None:
        """Start stage ``name`` (the previous one is done); ``total``: the number of stages, once it is known."""
        if self.bar is None:
            return
        if total is not None and total != self.bar.total:
            self.bar.total = total
        self.engine.close()
        if self._started:
            self.bar.update(1)
        self._started = True
        self.bar.set_postfix_str(name, refresh=True)

    def close(self) -> None:
        self.engine.close()
        if self.bar is not None:
            _finish(self.bar)
            self.bar = None

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SeriesBar:
    """Stages of one series: reading, then per run (irregular series have several) engine and deriving, then done.

    ``stage(msg)`` takes the pipeline's progress messages (``node.process.process_series``'s ``progress``),
    ``engine`` (an ``EngineBar`` under it) the engine's (its ``engine_progress``).
    """

    def __init__(self, title: str, enabled: bool) -> None:
        self.engine = EngineBar(enabled)
        self.bar = _bar(enabled, 3, title, None, "{desc} {bar} {n_fmt}/{total_fmt} stages [{elapsed}]{postfix}",
                        unit="stage")
        if self.bar is not None:
            self.bar.set_postfix_str("reading", refresh=True)

    def stage(self, msg: str) -> None:
        if self.bar is None:
            return
        m = _RUN.match(msg)
        if m and self.bar.total != 1 + 2 * int(m.group(2)):
            self.bar.total = 1 + 2 * int(m.group(2))  # reading + (engine, deriving) per run
        self.engine.close()
        self.bar.update(1)
        self.bar.set_postfix_str(msg, refresh=True)

    def close(self) -> None:
        self.engine.close()
        if self.bar is not None:
            _finish(self.bar)


@contextlib.contextmanager
def logs_through_bars(enabled: bool) -> Iterator[None]:
    """While bars are shown, log records are written above them (tqdm.write) instead of through them."""
    if not enabled:
        yield
        return
    with logging_redirect_tqdm():
        yield


@contextlib.contextmanager
def stage_bar(title: str, total: int, quiet: bool) -> Iterator[StageBar]:
    """A ``StageBar`` shown when ``wanted(quiet)``, log records written above it meanwhile; closed on exit."""
    enabled = wanted(quiet)
    with logs_through_bars(enabled), StageBar(title, total, enabled) as bar:
        yield bar


def bar_of(args: object) -> StageBar:
    """The ``StageBar`` that ``srnode bench`` hands a benchmark in its arguments (``args.bar``), or a silent one
    (a benchmark's ``run`` called directly, as tests do)."""
    bar = getattr(args, "bar", None)
    return bar if isinstance(bar, StageBar) else StageBar("", 1, False)
