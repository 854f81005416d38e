"""``NodeContext``: what the running node's components share (built by ``node.app.service.Node``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from node.audit import AuditLog
from node.config import Config
from node.ingest import Admission
from node.jobs import Executor, JobContext
from node.metrics import Metrics
from node.store import Index, Spool


@dataclass
class NodeContext:
    """What the running node's components share: the job context, the executor and the one admission."""

    jobs: JobContext
    executor: Executor
    admission: Admission
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def cfg(self) -> Config:
        """The node's configuration."""
        return self.jobs.cfg

    @property
    def spool(self) -> Spool:
        """The node's spool (files)."""
        return self.jobs.store.spool

    @property
    def index(self) -> Index:
        """The spool's index (states)."""
        return self.jobs.store.index

    @property
    def metrics(self) -> Metrics:
        """The node's Prometheus metrics."""
        return self.jobs.metrics

    @property
    def audit(self) -> AuditLog:
        """The node's audit log."""
        return self.jobs.audit
