"""``srnode reindex [--config FILE] [--fresh]``: rebuild the spool index from the spool's instance files.

The spool files are the truth. Every file under ``instances/<Study>/<Series>/<SOP>.dcm`` the index does not list
is read (header only) and recorded; its series then takes the normal way (stable → rules → job) once a node
runs. A damaged index (``srnode serve`` stops with "index ... is damaged") is moved aside first, with its -wal
and -shm files, as ``index.sqlite.damaged-<time>``, and a new one is built; ``--fresh`` does the same with a
readable index, kept as ``index.sqlite.replaced-<time>`` (its jobs and deliveries are forgotten; every series is
processed again; to process one ignored series again after a rule change, ``srnode retry JOB`` is enough). Stop
the node first: a reindex takes the spool's lock, so it is refused while a node serves the spool.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from node.config import load_config
from node.errors import NodeError, SpoolInUse
from node.ingest import reindex_spool
from node.store import Index, IndexDamaged, Spool


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config.toml (default: the embedded defaults)")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new index even if the current one is readable (it is moved aside)")


def move_aside(index_path: Path, why: str = "damaged") -> Path:
    """Rename the index and its -wal/-shm files to ``<name>.<why>-<time>`` (``why``: "damaged", or "replaced"
    for ``--fresh``); returns the new index name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = index_path.with_name(f"{index_path.name}.{why}-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = index_path.with_name(index_path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    return target


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    spool = Spool(cfg.spool_path, cfg.node.min_free_mb)
    try:
        fd = spool.lock()  # the serving node's lock: a reindex beside it would rebuild the index it writes
    except SpoolInUse as exc:  # another reason (the lock cannot be opened: permissions) says itself, as SpoolError
        raise NodeError(f"spool {spool.root} is in use by a running srnode serve (its lock srnode.lock is held): "
                        "stop the node first; a reindex beside it would move its index aside or add rows under it "
                        "(break19: with --fresh the node went on writing the moved-aside index, instances it "
                        "acknowledged then were in no index the next start reads)") from exc
    try:
        return _reindex(args, spool)
    finally:
        spool.unlock(fd)


def _reindex(args: argparse.Namespace, spool: Spool) -> int:
    path = spool.index_path
    if args.fresh and path.exists():
        print(f"index {path}: moved aside as {move_aside(path, 'replaced')} (--fresh; its job history is kept "
              "there, not in the new index)")
    try:
        index = Index(path, check=True)
    except IndexDamaged as exc:
        print(f"{exc}")
        print(f"index {path}: moved aside as {move_aside(path)}; building a new one from the spool")
        index = Index(path, check=True)
    before = index.count_instances()
    result = reindex_spool(spool, index)
    print(f"spool {spool.root}: {result.files} instance file(s); {before} were indexed, {result.added} added "
          f"({len(result.series)} series), {len(result.skipped)} skipped")
    for why in result.skipped:
        print(f"  skipped {why}")
    return 1 if result.skipped else 0
