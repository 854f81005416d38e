"""``srnode`` command line. The only place that configures logging.

Each sub-command lives in its own module, imported only when used, exposing
``configure(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from node import __version__
from node.app.logs import setup_logging
from node.errors import NodeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("node.app.service", "run the node: DICOM SCP, HTTP API, workers, outbox (SIGTERM stops gracefully)"),
    "process": ("node.app.process_cmd", "offline: super-resolve the series in IN_DIR into OUT_DIR (same pipeline)"),
    "status": ("node.app.status_cmd", "list jobs and their states from the spool index"),
    "retry": ("node.app.status_cmd", "re-queue dead-letter deliveries (and failed jobs) for another attempt"),
    "reindex": ("node.app.reindex_cmd", "rebuild the spool index from the spool's instance files"),
    "eval": ("node.bench.eval", "measure an engine against cubic/linear on a series (PSNR, SSIM, HU, uncertainty)"),
    "bench": ("node.bench.command", "benchmarks: engine timings, end-to-end latency, throughput"),
    "train": ("node.app.train_cmd", "train the shipped prior on a folder of series"),
    "fetch": ("node.app.fetch_cmd", "pull a study/series from a configured PACS (C-MOVE/C-GET/WADO-RS) and process it"),
    "worker": ("node.app.worker_cmd", "run a Celery GPU worker (executor.kind = 'celery')"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="srnode", description="Super-resolution DICOM node")
    parser.add_argument("--version", action="version", version=f"srnode {__version__}")
    parser.add_argument("--log-level", default="", help="DEBUG, INFO, WARNING (default: [node].log_level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, (_mod, help_) in COMMANDS.items():
        subs[name] = sub.add_parser(name, help=help_, description=help_)
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    # configure only the chosen sub-command (imports stay lazy: `srnode status` never loads torch)
    chosen = next((a for a in argv if a in COMMANDS), None)
    if chosen is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[chosen][0])
    module.configure(subs[chosen])
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "INFO")
    try:
        return int(module.run(args) or 0)
    except NodeError as exc:
        logging.getLogger("srnode").error("%s", exc)
        print(f"srnode {chosen}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
