"""Two jobs of one series in the runner at once, as two Celery workers run them (a shared spool): job 1 takes 6
slices and is still in its engine when the last 2 arrive, the series is decided again and job 2 runs on all 8 on
the other worker and finishes first. Job 1's results would be a derived series of part of the series, beside
job 2's, with the same SeriesNumber and no rejection note (job 2 looked for job 1's results before they
existed): they are never enqueued, job 1 ends 'superseded'. And a failed job that ``srnode retry`` re-queues after
a later job of its series replaced it is not run again.

The real runner, spool, index and cubic engine; the workers are threads, and an engine that waits on an event
holds job 1 in 'processing' (no timing). The same against the real node: ``tests/jobs/test_moved_on.py``.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pydicom

from models.cubic import CubicEngine
from models.engine import ENGINES, EngineOptions, EngineResult, Factors, VolumeInput
from node.app.phantom import write_phantom_series
from node.config import config_from_dict
from node.jobs import JobContext, run_job
from node.process import EngineCache
from node.store import DeliveryState, Instance, JobState, SeriesState
from tests.support.nodeproc import base_config


class Held:
    """Cubic; its first call waits until ``release`` is set (after saying so on ``entered``)."""

    name = "held"
    version = "0"
    entered = threading.Event()
    release = threading.Event()

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.cubic = CubicEngine(options)

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        if not Held.entered.is_set():
            Held.entered.set()
            assert Held.release.wait(120), "the test never released the engine"
        res = self.cubic.upscale(volume, factors)
        res.engine = self.name
        return res


def _context(tmp_path: Path) -> JobContext:
    raw = base_config(tmp_path)
    raw["rules"][0]["engine"] = "held"
    cfg = config_from_dict(raw)
    ctx = JobContext.open(cfg)
    return dataclasses.replace(ctx, engines=EngineCache({**ENGINES, "held": Held}))


def _add(ctx: JobContext, files: list[Path]) -> None:
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ctx.store.index.add_instance(Instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                              str(ds.StudyInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1",
                                              str(f), "CT01", ""), "CT", f.stat().st_size)


def test_a_job_whose_series_got_a_later_job_while_it_ran_sends_nothing(tmp_path: Path) -> None:
    Held.entered.clear()
    Held.release.clear()
    ctx = _context(tmp_path)
    ix = ctx.store.index
    files = write_phantom_series(tmp_path / "in", slices=8, size=32, step_mm=3.0, seed=71)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series, study = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    _add(ctx, files[2:])
    job1 = ix.create_job(series, "all-ct-mr", study_uid=study)
    worker_a = threading.Thread(target=run_job, args=(ctx, job1))
    worker_a.start()
    try:
        assert Held.entered.wait(120), "job 1 never reached its engine"
        _add(ctx, files[:2])  # the rest of the series, while job 1 runs on worker A
        job2 = ix.create_job(series, "all-ct-mr", study_uid=study)
        run_job(ctx, job2)  # worker B: job 2 runs on all 8 and finishes first
    finally:
        Held.release.set()
        worker_a.join(120)
    j1, j2 = ix.job(job1), ix.job(job2)
    assert (j2.state, j2.report["inputs"], j2.supersedes) == (JobState.SENDING, 8, job1)
    assert j1.state == JobState.SUPERSEDED, (j1.state, j1.reason)
    assert f"superseded by job {job2}" in j1.reason and "not sent" in j1.reason, j1.reason
    assert ix.deliveries(job1) == [], "results of 6 of 8 slices enqueued beside job 2's"
    assert not (ctx.store.spool.outbox / f"job-{job1}").exists(), "job 1's unsent results left in the outbox"
    assert [d.state for d in ix.deliveries(job2)] == [DeliveryState.PENDING]
    row = ix.series(series, study)
    assert row is not None and (row["state"], row["job_id"]) == (SeriesState.SENDING, job2)


def test_a_failed_job_retried_after_a_later_job_replaced_it_is_not_run_again(tmp_path: Path) -> None:
    Held.entered.set()  # the engine does not wait here
    ctx = _context(tmp_path)
    ix = ctx.store.index
    files = write_phantom_series(tmp_path / "in", slices=8, size=32, step_mm=3.0, seed=72)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series, study = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    _add(ctx, files[:1])
    job1 = ix.create_job(series, "all-ct-mr", study_uid=study)
    run_job(ctx, job1)  # one slice: "series cannot be a volume"
    assert ix.job(job1).state == JobState.FAILED
    _add(ctx, files[1:])  # the rest of the series: decided again, processed whole
    job2 = ix.create_job(series, "all-ct-mr", study_uid=study)
    run_job(ctx, job2)
    assert ix.job(job2).state == JobState.SENDING
    assert ix.requeue_job(job1)  # `srnode retry` with no argument re-queues every failed job
    run_job(ctx, job1)
    j1 = ix.job(job1)
    assert j1.state == JobState.SUPERSEDED and f"superseded by job {job2}" in j1.reason, (j1.state, j1.reason)
    assert ix.deliveries(job1) == []
    row = ix.series(series, study)
    assert row is not None and (row["state"], row["job_id"]) == (SeriesState.SENDING, job2)
