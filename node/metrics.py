"""Prometheus metrics of the node (the HTTP API exposes them on /metrics from the default registry).

Labels stay low-cardinality: statuses, stages, destination names and error classes, never UIDs or patient data.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    instances_received: Counter
    series_processed: Counter
    job_seconds: Histogram
    queue_depth: Gauge
    failures: Counter
    deliveries: Counter
    gpu_memory_bytes: Gauge
    active_associations: Gauge


def _make() -> Metrics:
    return Metrics(
        instances_received=Counter("srnode_instances_received_total", "C-STORE requests by outcome",
                                   ["status"]),
        series_processed=Counter("srnode_series_processed_total", "jobs finished, by outcome", ["outcome"]),
        job_seconds=Histogram("srnode_job_seconds", "job duration by stage", ["stage"],
                              buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)),
        queue_depth=Gauge("srnode_queue_depth", "jobs queued or processing"),
        failures=Counter("srnode_failures_total", "failures by reason (error class)", ["where", "reason"]),
        deliveries=Counter("srnode_deliveries_total", "delivery attempts by destination and outcome",
                           ["destination", "outcome"]),
        gpu_memory_bytes=Gauge("srnode_gpu_memory_bytes", "GPU memory allocated by the engine (peak of last job)"),
        active_associations=Gauge("srnode_active_associations", "DICOM associations open now"),
    )


METRICS = _make()  # one set per process (prometheus_client's default registry refuses duplicates)
