"""``srnode bench KIND``: benchmarks that print figures and write JSON to bench/results/.

Each benchmark is a module exposing ``configure(parser)`` and ``run(args) -> int``; ``all`` runs the
CPU-feasible set (``make bench``).
"""

from __future__ import annotations

import argparse
import importlib

from node.app.progress import stage_bar

# name -> (module, help): a new benchmark is a module of node/bench/ and a line here
BENCHES: dict[str, tuple[str, str]] = {
    "engine": ("node.bench.engine", "engine timings (CPU fast mode; GPU with --device cuda)"),
    "e2e": ("node.bench.e2e", "first instance sent -> last derived instance stored in Orthanc"),
    "ingest": ("node.bench.ingest", "C-STORE ingest vs dcmtk storescp and Orthanc: 16 senders, then 1 association"),
    "celery": ("node.bench.scaleout", "series/minute with 1 and 2 Celery workers"),
    "denoise": ("node.bench.denoise", "self-supervised denoising vs Gaussian/bilateral on the shared CT phantom"),
    "peers": ("node.bench.peers", "ECLARE (make peers-venv or --peer-python) vs srnode vs cubic on eval's thick inputs"),
}
def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench`` options to ``parser``."""
    parser.add_argument("kind", choices=[*BENCHES, "all"], help="which benchmark")
    parser.add_argument("--cpu-only", action="store_true", help="with 'all': skip what needs a GPU")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (there are none either when stderr is not a terminal)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark (see KIND --help)")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench KIND`` (``all``: engine, e2e, ingest, celery with their defaults); returns the exit
    code, non-zero when any benchmark failed. On a terminal each benchmark gets a bar of its stages (``args.bar``
    of the benchmark's arguments, ``node.app.progress.bar_of``) with the engine's steps under it."""
    kinds = ["engine", "e2e", "ingest", "celery"] if args.kind == "all" else [args.kind]
    rc = 0
    for kind in kinds:
        mod = importlib.import_module(BENCHES[kind][0])
        p = argparse.ArgumentParser(prog=f"srnode bench {kind}", description=BENCHES[kind][1])
        mod.configure(p)
        sub = p.parse_args(args.rest if args.kind != "all" else [])
        with stage_bar(f"bench {kind}", 1, getattr(args, "quiet", False)) as bar:
            sub.bar = bar
            rc |= int(mod.run(sub) or 0)
    return rc
