"""``srnode prune [--config FILE] [--dry-run]``: free the spool of what is safe elsewhere (``node.store.prune``).

Removes the received instances and the results' pixels of every series whose jobs ended (every delivery
delivered, confirmed where confirmation is configured) more than ``[node] retention_days`` ago; prints one line
per series (UIDs and what is freed, never a patient value) and a total. ``--dry-run`` changes nothing and says
what would be freed. A running node does the same by itself every hour; this command may run beside it (the
index transaction keeps them apart). Exit 1 when a file could not be removed (each named on stderr).
"""

from __future__ import annotations

import argparse
import sys

from node.config import load_config
from node.errors import NodeError
from node.store import Index, Spool, prune


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config.toml (default: the embedded defaults)")
    parser.add_argument("--dry-run", action="store_true", help="change nothing: print what would be freed")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    days = cfg.node.retention_days
    if not cfg.spool_path.is_dir() or not Spool(cfg.spool_path).index_path.is_file():
        where = f"the spool_dir of {cfg.path}" if cfg.path else "the embedded default; pass the node's --config"
        raise NodeError(f"no spool index under {cfg.spool_path.resolve()} ({where}): nothing to prune")
    spool = Spool(cfg.spool_path, cfg.node.min_free_mb)
    if days <= 0:
        print("[node] retention_days = 0: the spool is kept for ever, nothing pruned")
        return 0
    result = prune(spool, Index(spool.index_path), days, dry_run=args.dry_run)
    for p in result.series:
        print(p.line(args.dry_run))
    total = sum(p.mb for p in result.series)
    print(f"{'would prune' if args.dry_run else 'pruned'} {len(result.series)} series, "
          f"{'would free' if args.dry_run else 'freed'} {total:.1f} MB (retention {days:g} day(s))")
    for why in result.errors:
        print(f"srnode prune: {why}", file=sys.stderr)
    return 1 if result.errors else 0
