"""``srnode`` command line. The only place that configures logging.

Each sub-command lives in its own module, imported only when used, exposing
``configure(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys

from node import __version__
from node.app.logs import setup_logging
from node.errors import NodeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("node.app.service", "run the node: DICOM SCP, HTTP API, workers, outbox (SIGTERM stops gracefully)"),
    "process": ("node.app.process_cmd", "offline: super-resolve the series in IN_DIR into OUT_DIR (same pipeline)"),
    "check": ("node.app.check_cmd", "check OUT_DIR of `process` against IN_DIR: geometry, values, dciodvfy; "
                                    "one line per derived series"),
    "status": ("node.app.status_cmd", "list jobs and their states from the spool index"),
    "retry": ("node.app.status_cmd", "re-queue dead-letter deliveries and failed jobs; an ignored job named by id:"
              " its series matched against the rules again"),
    "replay": ("node.app.status_cmd", "queue a job's series again under its rule as configured now (a delivered "
               "job sent to another destination)"),
    "prune": ("node.app.prune_cmd", "remove from the spool what [node] retention_days allows (every delivery "
              "delivered): one line per series; --dry-run says what would be freed"),
    "reindex": ("node.app.reindex_cmd", "rebuild the spool index from the spool's instance files"),
    "eval": ("node.bench.eval", "measure an engine against cubic/linear on a series (PSNR, SSIM, HU, uncertainty)"),
    "bench": ("node.bench.command", "benchmarks: engine timings, end-to-end latency, throughput"),
    "train": ("node.app.train_cmd", "train the shipped prior on a folder of series"),
    "fetch": ("node.app.fetch_cmd", "pull a study/series from a configured PACS (C-MOVE/C-GET/WADO-RS) and process it"),
    "worker": ("node.app.worker_cmd", "run a Celery GPU worker (executor.kind = 'celery')"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``srnode`` parser and one bare sub-parser per command (its options are added by its module)."""
    parser = argparse.ArgumentParser(prog="srnode", description="Super-resolution DICOM node",
                                     epilog="srnode COMMAND --help: the command's options")
    parser.add_argument("--version", action="version", version=f"srnode {__version__}")
    parser.add_argument("--log-level", default="", help="DEBUG, INFO, WARNING, ERROR; before the command (default: [node].log_level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, (_mod, help_) in COMMANDS.items():
        subs[name] = sub.add_parser(name, help=help_, description=help_)
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    """Run one ``srnode`` command; returns the exit status.

    0: done; 1: a user error (one line on stderr, ``srnode COMMAND: error: ...``, no traceback) or a command that
    reports failures; 2: a usage error (argparse's message); 130: interrupted. Output cut short by a closed pipe
    (``srnode status --json | head -1``) ends quietly.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    # configure only the chosen sub-command (imports stay lazy: `srnode status` never loads torch);
    # without one, argparse answers --help / --version (exit 0) and a mistyped command (exit 2) by itself
    chosen = next((a for a in argv if a in COMMANDS), None)
    module = None
    if chosen is not None:
        module = importlib.import_module(COMMANDS[chosen][0])
        module.configure(subs[chosen])
    args = parser.parse_args(argv)
    if module is None:
        parser.print_usage(sys.stderr)
        print("srnode: error: a COMMAND is required (srnode --help lists them)", file=sys.stderr)
        return 2
    setup_logging(args.log_level or "INFO")
    try:
        rc = int(module.run(args) or 0)
        sys.stdout.flush()
        return rc
    except BrokenPipeError as exc:
        if _stdout_gone():
            return _stdout_closed()
        print(f"srnode {chosen}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (NodeError, OSError) as exc:  # a user's error or the machine's (port, disk, permission): one line
        print(f"srnode {chosen}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, NodeError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (a BrokenPipeError may also come from a network peer)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _fd, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): stop quietly, and keep the exit flush from failing too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
