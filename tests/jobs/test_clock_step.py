"""The system clock stepped back (NTP correcting a clock that ran ahead; a hardware clock kept in local time,
corrected after boot) between the moment the node stamped a time in its index and the moment it compares it.

The step is made as the node sees it: the node stopped, the index's stamps moved one hour later (what a clock
stepped back by an hour since makes of them), the node started again. The real node, real folder destination.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu, wait_until

HOUR = 3600.0


def _shift(index: Path, sql: str) -> int:
    with sqlite3.connect(index) as c:
        n = c.execute(sql, (HOUR,)).rowcount
    return int(n)


def test_a_series_received_before_the_clock_stepped_back_is_processed_after_stable_age_s(tmp_path: Path) -> None:
    """break19: a series received, then the clock stepped back an hour before it was quiet for stable_age_s. Before:
    its last_received lay an hour ahead of the clock, so it was 'quiet' only an hour later: no job for an hour,
    nothing logged (still none 60 s after the restart, with stable_age_s 1). Now a last_received ahead of the
    clock is restamped now (a WARNING says so): processed and delivered after stable_age_s."""
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600}})
    try:
        files = write_phantom_series(tmp_path / "a", slices=6, size=64, step_mm=5.0, seed=3)
        storescu(files, node.port)
        node.stop()
        assert _shift(node.spool / "index.sqlite", "UPDATE series SET last_received = last_received + ?") == 1
        node.restart({"node": {"stable_age_s": 1}})
        jobs = node.wait_jobs(lambda js: js and js[0]["state"] == "delivered", 60, what="job 1 delivered")
    finally:
        node.stop()
    assert jobs[0]["instances"] == 6
    assert "the clock is behind the time 1 series' last instance was stamped with" in node.log()


def test_a_delivery_retried_across_a_clock_step_back_waits_its_backoff_not_the_step(tmp_path: Path) -> None:
    """break19: a delivery failed (its folder could not be written) and waits its backoff (backoff_max_s 1 s); the
    clock then steps back an hour; the folder is writable again. Before: its next attempt lay an hour ahead of the
    clock: still pending 60 s after the restart. Now it is brought back to backoff_max_s from now: delivered."""
    blocker = tmp_path / "node" / "out"  # the base configuration's folder destination
    blocker.parent.mkdir()
    blocker.write_text("a file where the destination's folder should be")
    node = NodeProc.start(tmp_path / "node", {"outbox": {"max_attempts": 1000, "backoff_initial_s": 1.0,
                                                         "backoff_max_s": 1.0}})
    try:
        storescu(write_phantom_series(tmp_path / "a", slices=6, size=64, step_mm=5.0, seed=4), node.port)
        node.wait_jobs(lambda js: js and any(d["attempts"] >= 1 for d in js[0]["deliveries"]), 60,
                       what="a failed attempt of job 1's delivery")
        node.stop()
        assert _shift(node.spool / "index.sqlite",
                      "UPDATE deliveries SET next_attempt = next_attempt + ? WHERE state = 'pending'") == 1
        blocker.unlink()
        node.launch()
        jobs = node.wait_jobs(lambda js: js and js[0]["state"] == "delivered", 60, what="job 1 delivered")
    finally:
        node.stop()
    assert jobs[0]["deliveries"][0]["state"] == "delivered"
    assert wait_until(lambda: list(blocker.rglob("*.dcm")), 5, what="files in the folder")
    assert "the clock is behind the time 1 deliveries' next attempt" in node.log()


def test_a_dicomweb_worker_s_delivery_retried_across_a_clock_step_back_waits_its_backoff(tmp_path: Path) -> None:
    """break19: a `data_access = "dicomweb"` Celery worker delivers its job's results itself
    (``celery_remote._deliver_now``: attempts in order, sleeping until the next is due). A next attempt stamped
    before the clock stepped back an hour: before, the worker slept 5 s at a time for that hour (its job, and
    every job behind it on that worker, waiting; still pending after 60 s here). Now brought back to backoff_max_s
    from now, as in the node's outbox: delivered."""
    import threading
    import time

    from node.config import config_from_dict
    from node.jobs.celery_remote import _deliver_now
    from node.jobs.context import JobContext
    from node.store import DeliveryState, Instance, JobState

    out = tmp_path / "out"
    cfg = config_from_dict({"node": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 1},
                            "outbox": {"backoff_initial_s": 1.0, "backoff_max_s": 1.0},
                            "destinations": [{"name": "out", "kind": "folder", "path": str(out)}],
                            "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["out"]}]})
    ctx = JobContext.open(cfg)
    index = ctx.store.index
    results = write_phantom_series(tmp_path / "results", slices=2, size=32, step_mm=5.0, seed=5)
    series = "1.2.826.0.1.77.19"
    index.add_instance(Instance(f"{series}.1", series, "1.2.826.0.1.76", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", "/x.dcm", "CT01", ""), "CT", 1)
    assert index.mark_stable(series, time.time() + 1)
    job = index.create_job(series, "ct")
    assert index.claim_job(job) is not None
    index.add_deliveries(job, {"out": [str(f) for f in results]})
    index.finish_job(job, JobState.SENDING)
    (d,) = index.deliveries(job)
    index.delivery_failed(d.id, "the folder could not be written", time.time() + 1.0 + HOUR)  # then the step
    worker = threading.Thread(target=_deliver_now, args=(ctx, job), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the worker still waits for a next attempt an hour ahead of the clock"
    (d,) = index.deliveries(job)
    assert d.state is DeliveryState.DELIVERED, (d.state, d.reason)
    assert len(list(out.rglob("*.dcm"))) == 2
