"""``srnode fetch --study UID [--series UID] --from NAME``: pull a study or series from a configured source.

Runs beside a running node (the spool index is safe across processes): the instances are admitted into the
node's spool and processed by the node once stable. Prints the outcome as JSON; exit 1 when any was refused.
"""

from __future__ import annotations

import argparse
import json

from node.config import load_config
from node.ingest import Admission, fetch
from node.ingest.pull import METHODS
from node.metrics import Metrics
from node.store import open_store


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode fetch`` options to ``parser``."""
    parser.add_argument("--study", required=True, help="StudyInstanceUID to retrieve")
    parser.add_argument("--series", default="", help="SeriesInstanceUID (default: every series of the study)")
    parser.add_argument("--from", dest="source", required=True, help="name of a [[sources]] entry")
    parser.add_argument("--method", choices=METHODS, default="",
                        help="for kind 'dicom': C-MOVE to the running node (default) or C-GET into the spool")
    parser.add_argument("--config", default=None, help="config.toml (default: embedded defaults)")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode fetch``; returns the exit code (1 when an instance was refused). Raises ConfigError,
    SpoolError, FetchError (``node.ingest.pull.fetch``)."""
    cfg = load_config(args.config)
    store = open_store(cfg)
    admission = Admission(cfg, store.spool, store.index, Metrics.create())
    result = fetch(cfg, args.source, args.study, args.series, admission=admission, method=args.method)
    print(json.dumps(result.as_dict(), indent=2))
    return 0 if not result.refused else 1
