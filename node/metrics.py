"""Prometheus metrics of the node: one ``Metrics`` object per running node, carried by its context.

Each ``Metrics`` owns its own ``CollectorRegistry`` (no process-wide default registry): the HTTP API exposes
``metrics.registry`` on ``/metrics``; offline commands and tests make their own. Labels stay low-cardinality:
statuses, stages, destination names and error classes, never UIDs or patient data.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    """The node's metrics, all in ``registry``: instances received {status}, series processed {outcome}, job
    seconds {stage}, queue depth, failures {where, reason}, deliveries {destination, outcome}, GPU memory
    bytes (peak of the last job), active DICOM associations, delivery confirmations {destination, method,
    outcome}, associations refused {reason}. Make one with :meth:`create`."""

    registry: CollectorRegistry
    instances_received: Counter
    series_processed: Counter
    job_seconds: Histogram
    queue_depth: Gauge
    failures: Counter
    deliveries: Counter
    gpu_memory_bytes: Gauge
    active_associations: Gauge
    instance_conflicts: Counter
    incoming_bytes: Gauge
    confirmations: Counter
    associations_refused: Counter

    @classmethod
    def create(cls) -> Metrics:
        """A fresh set of the node's metrics in a registry of their own."""
        r = CollectorRegistry()
        return cls(
            registry=r,
            instances_received=Counter("srnode_instances_received_total", "instances offered to admission, by"
                                       " DIMSE status (C-STORE, STOW-RS, pulls)", ["status"], registry=r),
            series_processed=Counter("srnode_series_processed_total", "jobs finished, by outcome", ["outcome"],
                                     registry=r),
            job_seconds=Histogram("srnode_job_seconds", "job duration by stage", ["stage"],
                                  buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r),
            queue_depth=Gauge("srnode_queue_depth", "jobs queued or processing", registry=r),
            failures=Counter("srnode_failures_total", "failures by reason (error class)", ["where", "reason"],
                             registry=r),
            deliveries=Counter("srnode_deliveries_total", "delivery attempts by destination and outcome",
                               ["destination", "outcome"], registry=r),
            gpu_memory_bytes=Gauge("srnode_gpu_memory_bytes", "GPU memory allocated by the engine (peak of last"
                                   " job)", registry=r),
            active_associations=Gauge("srnode_active_associations", "DICOM associations open now", registry=r),
            instance_conflicts=Counter("srnode_instance_conflicts_total", "resends of a known SOPInstanceUID that"
                                       " differ from the stored copy (kept aside in spool/conflicts/)", registry=r),
            incoming_bytes=Gauge("srnode_spool_incoming_bytes", "bytes in spool/incoming/ (datasets being"
                                 " received)", registry=r),
            confirmations=Counter("srnode_delivery_confirmations_total", "delivery confirmations by destination,"
                                  " method (commitment, count, none) and outcome (confirmed, mismatch, overdue,"
                                  " unconfirmed, not-confirmed)", ["destination", "method", "outcome"], registry=r),
            associations_refused=Counter("srnode_associations_refused_total", "DICOM associations or connections"
                                         " refused, by reason (unknown-caller, called-ae, limit, max-pdu,"
                                         " tls-handshake, no-request, unreadable-request), counted even when the"
                                         " log line is over refusals_logged_per_minute", ["reason"], registry=r),
        )
