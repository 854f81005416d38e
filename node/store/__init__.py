"""Stage ``store``: the spool (atomic files, disk watermark) and its SQLite index (instances, series, jobs,
deliveries, their states as enums). The lowest stage: it imports nothing of the node but config and errors.

The spool files are the truth; the index says where each instance is and what happened to it. Everything the
node does must be restartable from these two alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.config import Config
from node.store.index import HEADER_DECLARED, MAX_DECLARED_INSTANCES, NO_HINT, Index, SeriesKey, SizeHint
from node.store.jobs import poison_reason
from node.store.prune import PruneResult, prune, pruned_cover, pruned_leftover
from node.store.schema import DAMAGED_HINT, Delivery, IndexDamaged, Instance, Job
from node.store.spool import Spool, Stored, atomic_copy, atomic_write, fsync_dir, valid_uid
from node.store.states import JOB_DONE_STATES, NOT_SENT, DeliveryState, JobState, SeriesState

__all__ = [
    "DAMAGED_HINT",
    "HEADER_DECLARED",
    "MAX_DECLARED_INSTANCES",
    "NO_HINT",
    "poison_reason",
    "prune",
    "pruned_cover",
    "pruned_leftover",
    "PruneResult",
    "JOB_DONE_STATES",
    "NOT_SENT",
    "Delivery",
    "DeliveryState",
    "Index",
    "IndexDamaged",
    "Instance",
    "Job",
    "JobState",
    "SeriesKey",
    "SeriesState",
    "SizeHint",
    "Spool",
    "Store",
    "Stored",
    "atomic_copy",
    "atomic_write",
    "fsync_dir",
    "open_store",
    "valid_uid",
]


@dataclass(frozen=True)
class Store:
    """A spool and its index, opened together (one per process and spool folder: pass it, do not reopen)."""

    spool: Spool
    index: Index


def open_store(cfg: Config, check: bool = False) -> Store:
    """Open (create on first use) the spool at ``[node].spool_dir`` and its index. Raises SpoolError
    (``IndexDamaged`` when the index file is not readable; ``check``: every page is checked first)."""
    spool = Spool(cfg.spool_path, cfg.node.min_free_mb)
    return Store(spool, Index(spool.index_path, check=check))
