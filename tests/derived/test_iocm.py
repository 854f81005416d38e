"""IOCM rejection notes: a reprocessed series retires the results already sent, also past jobs of the series that
produced nothing (superseded while still queued)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom

from node.bench.phantom import write_phantom_series
from node.config import load_config
from node.derived import reject_superseded
from node.process import process_series
from node.store import Instance, JobState, open_store


def test_rejection_note_reaches_back_past_jobs_without_results(tmp_path: Path) -> None:
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, spool_dir=str(tmp_path / "spool")))
    store = open_store(cfg)
    files = write_phantom_series(tmp_path / "in", slices=5, size=32, step_mm=3.0)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        store.index.add_instance(Instance(sop_uid=ds.SOPInstanceUID, series_uid=ds.SeriesInstanceUID,
                                          study_uid=ds.StudyInstanceUID, sop_class=ds.SOPClassUID,
                                          transfer_syntax="1.2.840.10008.1.2.1", path=str(f), calling_ae="CT01",
                                          allowed_rules=""), "CT", f.stat().st_size)
    series = str(first.SeriesInstanceUID)
    # job 1 ran and delivered its derived series
    job1 = store.index.create_job(series, "r")
    res = process_series(files, cfg.rules[0], cfg, store.spool.job_dir(job1), engine_name="cubic")
    store.index.finish_job(job1, JobState.DELIVERED, derived_series_uid=res.derived_series_uid)
    # late instances: job 2 queued, then superseded while still queued by job 3 (job 2 made nothing)
    job2 = store.index.create_job(series, "r")
    job3 = store.index.create_job(series, "r")
    assert store.index.job(job2).state == JobState.SUPERSEDED
    notes = reject_superseded(store.index, store.spool.outbox, store.index.job(job3), "1.2.3.999", cfg.derive,
                              tmp_path / "out")
    assert len(notes) == 1
    ko = pydicom.dcmread(notes[0])
    rejected = {i.ReferencedSOPInstanceUID for s in ko.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    derived = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in res.derived_files}
    assert derived and derived <= rejected, "job 1's derived instances are not all in the rejection note"
