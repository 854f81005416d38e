"""A full spool disk while a job writes its results (derived slices, Parametric Map, sigma card) fails the job
cleanly (``node.process.space``, ``node.jobs.runner``): the job ends 'failed' with one line naming the reason,
its partial ``outbox/job-<id>`` folder is gone (its space back), the received instances stay indexed, nothing is
enqueued, and once space returns the next job succeeds. Two ways to the full disk, on a real small tmpfs (root
only, as ``tests/ingest/test_durability.py``): the watermark ``[node] min_free_mb`` refusing before anything is
written, and a real ENOSPC in the middle of the derived slices (the watermark checks switched off, as when
another writer fills the disk between a check and a write). Also: a job left 'processing' is re-queued at start.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.bench.ingest import write_series
from node.config import Config, config_from_dict
from node.errors import SpoolError
from node.ingest import Admission
from node.ingest.admit import Caller
from node.jobs import run_job
from node.jobs import runner as runner_module
from node.jobs.context import JobContext
from node.metrics import Metrics
from node.process import describe_write_error, write_error
from node.process import space as space_module
from node.store import JobState
from tests.support.peers import mount_tmpfs

MB = 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "disk"
    if not mount_tmpfs(d, "6m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): no small real file system to fill")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _cfg(disk: Path, min_free_mb: int) -> Config:
    return config_from_dict({
        "node": {"spool_dir": str(disk / "spool"), "min_free_mb": min_free_mb},
        "engine": {"name": "cubic", "device": "cpu"},
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "through_plane_factor": 2, "destinations": []}],
    })


def _admit(ctx: JobContext, files: list[Path]) -> str:
    """Store ``files`` in the spool as ingest does; returns their series UID."""
    adm = Admission(ctx.cfg, ctx.store.spool, ctx.store.index, Metrics.create())
    for f in files:
        adm.admit_file(f, Caller("CT01"))
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A file on ``disk`` taking its free space but about ``leave_bytes`` (remove it to give the space back)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def _expect_failed_clean(ctx: JobContext, job_id: int, series: str, n_inputs: int, words: str) -> str:
    job = ctx.store.index.job(job_id)
    assert job.state == JobState.FAILED, (job.state, job.reason)
    assert words in job.reason, job.reason
    assert "srnode retry" in job.reason and "\n" not in job.reason, job.reason
    assert not (ctx.store.spool.outbox / f"job-{job_id}").exists(), "partial results left in the outbox"
    assert ctx.store.index.deliveries(job_id) == []
    kept = ctx.store.index.instances_of(series)
    assert len(kept) == n_inputs and all(Path(i.path).is_file() for i in kept), "received instances lost"
    return job.reason


def test_below_the_watermark_a_job_fails_before_writing_and_the_next_succeeds(
        disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctx = JobContext.open(_cfg(disk, min_free_mb=1))
    files = write_series(tmp_path / "ct", 31, 12, 128, tag="wm-")  # 12 x 32 KiB in; about 0.7 MB out
    series = _admit(ctx, files)
    filler = _fill(disk, leave_bytes=1 * MB + 256 * 1024)  # above the watermark, but not by the results' size
    job_id = ctx.store.index.create_job(series, "ct")
    with caplog.at_level(logging.WARNING, logger="node.jobs.runner"):
        run_job(ctx, job_id)
    reason = _expect_failed_clean(ctx, job_id, series, len(files), "disk full before writing results")
    assert "node.min_free_mb = 1" in reason, reason
    assert not any(r.exc_info for r in caplog.records), "a traceback for a full disk"
    filler.unlink()  # space returns: the next job of the series succeeds
    job2 = ctx.store.index.create_job(series, "ct")
    run_job(ctx, job2)
    done = ctx.store.index.job(job2)
    assert done.state == JobState.DELIVERED, (done.state, done.reason)
    assert len(list((ctx.store.spool.outbox / f"job-{job2}" / "derived").glob("*.dcm"))) == 2 * len(files) - 1


def test_enospc_in_the_middle_of_the_derived_slices_fails_cleanly_and_the_next_succeeds(
        disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ctx = JobContext.open(_cfg(disk, min_free_mb=0))
    files = write_series(tmp_path / "ct", 32, 12, 128, tag="enospc-")
    series = _admit(ctx, files)
    # as when another writer fills the disk between a check and a write: the writes themselves meet ENOSPC
    monkeypatch.setattr(space_module.ResultsRoom, "check", lambda *_a, **_k: None)
    filler = _fill(disk, leave_bytes=300 * 1024)  # room for some of the 23 derived slices (32 KiB each), not all
    job_id = ctx.store.index.create_job(series, "ct")
    with caplog.at_level(logging.WARNING):
        run_job(ctx, job_id)  # records the outcome itself: nothing escapes
    reason = _expect_failed_clean(ctx, job_id, series, len(files), "disk full while writing results")
    assert "No space left on device (ENOSPC)" in reason and "at derived slice" in reason \
        and f"job-{job_id}/derived/IM" in reason, reason
    assert not any(r.exc_info for r in caplog.records), "a traceback for a full disk"
    assert "could not be recorded" not in caplog.text
    filler.unlink()
    job2 = ctx.store.index.create_job(series, "ct")
    run_job(ctx, job2)
    done = ctx.store.index.job(job2)
    assert done.state == JobState.DELIVERED, (done.state, done.reason)


def test_a_job_left_processing_is_requeued_at_start(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, min_free_mb=0)
    ctx = JobContext.open(cfg)
    files = write_series(tmp_path / "ct", 33, 3, 32, tag="stuck-")
    series = _admit(ctx, files)
    job_id = ctx.store.index.create_job(series, "ct")
    assert ctx.store.index.claim_job(job_id) is not None  # a worker that could not record its outcome
    assert job_id in ctx.store.index.requeue_interrupted(processing=True, max_attempts=cfg.node.max_job_attempts)
    assert ctx.store.index.job(job_id).state == JobState.QUEUED
    run_job(ctx, job_id)
    assert ctx.store.index.job(job_id).state == JobState.DELIVERED


def test_an_outcome_the_index_cannot_take_yet_is_recorded_on_a_later_try(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = JobContext.open(_cfg(tmp_path, min_free_mb=0))
    series = _admit(ctx, write_series(tmp_path / "ct", 34, 3, 32, tag="record-"))
    job_id = ctx.store.index.create_job(series, "ct")
    real, calls = ctx.store.index.enqueue_results, []

    def full_once(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise SpoolError("index: cannot commit: database or disk is full")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ctx.store.index, "enqueue_results", full_once)
    monkeypatch.setattr(runner_module, "RECORD_DELAYS_S", (0.0,))
    run_job(ctx, job_id)
    assert len(calls) == 2
    assert ctx.store.index.job(job_id).state == JobState.DELIVERED


def test_a_write_error_is_found_behind_pydicoms_wrapper_and_told_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / "outbox" / "job-7" / "derived" / "x.tmp"))
    try:
        try:
            raise cause
        except OSError as exc:  # pydicom's filewriter: a new OSError without errno, the original as its cause
            raise OSError(f"With tag (7FE0,0010) got exception: {exc}") from exc
    except OSError as wrapped:
        found = write_error(wrapped)
    assert found is cause
    line = describe_write_error(cause, root)
    assert line == ("disk full while writing results: No space left on device (ENOSPC) "
                    "(outbox/job-7/derived/x.tmp)"), line
    eio = describe_write_error(OSError(errno.EIO, os.strerror(errno.EIO)))
    assert eio == "write error while writing results: Input/output error (EIO)", eio
    assert write_error(ValueError("no OSError here")) is None
