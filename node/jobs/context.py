"""``JobContext``: what running jobs needs, opened once per process (the node, a Celery worker) and passed on."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.audit import AuditLog
from node.config import Config
from node.metrics import Metrics
from node.process import EngineCache
from node.store import Store, open_store


@dataclass(frozen=True)
class JobContext:
    """The configuration, the spool and its index, metrics, the audit log and the engines of one process."""

    cfg: Config
    store: Store
    metrics: Metrics
    audit: AuditLog
    engines: EngineCache = field(default_factory=EngineCache)

    @classmethod
    def open(cls, cfg: Config, metrics: Metrics | None = None, check: bool = False) -> JobContext:
        """Open the spool of ``cfg`` (SpoolError when it cannot be; ``check``: every page of the index is checked
        first, IndexDamaged when one is not readable) with fresh metrics unless given."""
        store = open_store(cfg, check=check)
        audit = AuditLog(cfg.node.audit_log or store.spool.root / "audit.log")
        return cls(cfg, store, metrics or Metrics.create(), audit)
