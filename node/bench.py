"""``srnode bench KIND``: benchmarks that print figures and write JSON to bench/results/.

Each benchmark is a module exposing ``configure(parser)`` and ``run(args) -> int``; ``all`` runs the
CPU-feasible set (``make bench``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from node import __version__

# name -> (module, help). Teammates add their benchmark here.
BENCHES: dict[str, tuple[str, str]] = {
    "engine": ("node.bench_engine", "engine timings (CPU fast mode; GPU with --device cuda)"),
    "e2e": ("node.bench_e2e", "first instance sent -> last derived instance stored in Orthanc"),
    "ingest": ("node.bench_ingest", "C-STORE ingest throughput vs dcmtk storescp, 16 concurrent senders"),
    "celery": ("node.bench_celery", "series/minute with 1 and 2 Celery workers"),
    "denoise": ("node.bench_denoise", "self-supervised denoising vs Gaussian/bilateral on the shared CT phantom"),
}
RESULTS = Path("bench/results")


def write_result(name: str, figures: dict[str, Any], command: str | None = None) -> Path:
    """Write ``figures`` to bench/results/<name>-<UTC time>.json with the command and machine that made them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"{name}-{stamp}.json"
    doc = {
        "benchmark": name,
        "command": command or " ".join(["srnode", *sys.argv[1:]]),
        "srnode_version": __version__,
        "machine": {"node": platform.node(), "machine": platform.machine(), "python": platform.python_version()},
        "utc": stamp,
        "figures": figures,
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=[*BENCHES, "all"], help="which benchmark")
    parser.add_argument("--cpu-only", action="store_true", help="with 'all': skip what needs a GPU")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark (see KIND --help)")


def run(args: argparse.Namespace) -> int:
    kinds = ["engine", "e2e", "ingest", "celery"] if args.kind == "all" else [args.kind]
    rc = 0
    for kind in kinds:
        mod = importlib.import_module(BENCHES[kind][0])
        p = argparse.ArgumentParser(prog=f"srnode bench {kind}", description=BENCHES[kind][1])
        mod.configure(p)
        sub = p.parse_args(args.rest if args.kind != "all" else [])
        rc |= int(mod.run(sub) or 0)
    return rc
