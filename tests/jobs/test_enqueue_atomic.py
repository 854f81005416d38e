"""A job's deliveries and its state 'sending' are one transaction: the index never holds the deliveries of a job
still 'processing' (a kill -9 between two transactions left them so: the outbox sent results of a job the next
start re-queued and ran again, wiping its outbox folder under the sender). Here the index refuses the second
half (a trigger on 'sending'; in the field a kill -9, a full disk, a lock held past the busy timeout): nothing of
the first half may stay. The real runner, spool, index and cubic engine."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from node.app.phantom import write_phantom_series
from node.config import config_from_dict
from node.jobs import JobContext, run_job
from node.jobs import runner as runner_mod
from node.store import Instance, JobState
from tests.support.nodeproc import base_config


def test_deliveries_and_sending_are_recorded_together_or_not_at_all(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_mod, "RECORD_DELAYS_S", ())  # a refused record escapes at once (no 30 s of retries)
    ctx = JobContext.open(config_from_dict(base_config(tmp_path)))
    ix = ctx.store.index
    files = write_phantom_series(tmp_path / "in", slices=4, size=32, step_mm=3.0, seed=73)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ix.add_instance(Instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                                 str(ds.SOPClassUID), "1.2.840.10008.1.2.1", str(f), "CT01", ""), "CT",
                        f.stat().st_size)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    job = ix.create_job(str(ds.SeriesInstanceUID), "all-ct-mr", study_uid=str(ds.StudyInstanceUID))
    db = sqlite3.connect(ctx.store.spool.root / "index.sqlite", timeout=60, isolation_level=None)
    db.execute("CREATE TRIGGER refuse_sending BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'sending' BEGIN"
               " SELECT RAISE(ABORT, 'test: the index refuses the state sending'); END")
    run_job(ctx, job)
    done = ix.job(job)
    assert done.state is JobState.FAILED, done  # the outcome refused: failed with why ('srnode retry' re-runs it)
    assert "could not be recorded in the index" in done.reason and "refuses the state sending" in done.reason
    assert ix.deliveries(job) == []  # and no delivery left for the outbox to send (before: one, 'pending')
    assert not (ctx.store.spool.outbox / f"job-{job}").exists()  # its results removed, their space back
    db.execute("DROP TRIGGER refuse_sending")
    db.close()
    assert ix.requeue_job(job)
    run_job(ctx, job)
    assert ix.job(job).state is JobState.SENDING
    assert [d.destination for d in ix.deliveries(job)] == ["out"]
