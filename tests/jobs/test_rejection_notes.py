"""IOCM rejection notes go only where the results they retire went (open16).

A job superseding an earlier one (late instances) writes a rejection note retiring the earlier results. Before, the
note was added to the deliveries of every destination of the new job's rule: a destination the earlier results
never reached (added to the rule since, or whose delivery of them was replaced before it was sent) got a Key
Object Selection "Rejected for Quality Reasons" naming instances it never held. Now each destination gets the note
of the earlier results that had a delivery there; the others get none, and the job's report says why (a reason
starting ``NOT_SENT``). The real runner, spool, index, cubic engine, outbox and folder destinations."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pydicom
import pytest

from node.app.phantom import write_phantom_series
from node.config import Config, config_from_dict
from node.jobs import JobContext, run_job
from node.send.outbox import Outbox
from node.store import DeliveryState, Instance, JobState
from node.store.states import NOT_SENT
from tests.support.nodeproc import base_config


def _config(tmp_path: Path, destinations: list[str]) -> Config:
    raw = base_config(tmp_path)
    raw["destinations"] = [{"name": n, "kind": "folder", "path": str(tmp_path / n)} for n in ("a", "b", "c")]
    raw["rules"][0]["destinations"] = destinations
    return config_from_dict(raw)


def _add(ctx: JobContext, files: list[Path]) -> None:
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ctx.store.index.add_instance(Instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                              str(ds.StudyInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1",
                                              str(f), "CT01", ""), "CT", f.stat().st_size)


def _notes(ctx: JobContext, job: int) -> dict[str, set[str]]:
    """Per destination of ``job``: the derived SeriesInstanceUIDs its rejection notes (KO files) retire."""
    out: dict[str, set[str]] = {}
    for d in ctx.store.index.deliveries(job):
        out[d.destination] = set()
        for f in d.files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if ds.Modality == "KO":
                out[d.destination] |= {s.SeriesInstanceUID for st in ds.CurrentRequestedProcedureEvidenceSequence
                                       for s in st.ReferencedSeriesSequence}
    return out


def test_a_rejection_note_goes_only_where_the_results_it_retires_had_a_delivery(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=8, size=32, step_mm=3.0, seed=1601)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series, study = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    # job 1 (6 of 8 slices) to a and c: delivered to a; its delivery to c still waits (c is down)
    ctx = JobContext.open(_config(tmp_path, ["a", "c"]))
    ix = ctx.store.index
    outbox = Outbox(ctx.cfg, ix, ctx.metrics)
    _add(ctx, files[2:])
    job1 = ix.create_job(series, "all-ct-mr", study_uid=study)
    run_job(ctx, job1)
    (to_a,) = [d for d in ix.deliveries(job1) if d.destination == "a"]
    outbox.attempt(to_a)
    assert ix.delivery(to_a.id).state == DeliveryState.DELIVERED  # type: ignore[union-attr]
    # a late slice: job 2, its rule now also to b (added to the configuration meanwhile)
    ctx2 = dataclasses.replace(ctx, cfg=_config(tmp_path, ["a", "b", "c"]))
    _add(ctx, files[1:2])
    job2 = ix.create_job(series, "all-ct-mr", study_uid=study)
    run_job(ctx2, job2)
    d1 = ix.job(job1).derived_series_uid
    assert ix.job(job2).state == JobState.SENDING
    notes = _notes(ctx, job2)
    assert notes["a"] == {d1}, notes  # job 1's results are at a: retired there
    assert notes["b"] == set(), notes  # before: a note to b, which never held job 1's results
    assert notes["c"] == {d1}, notes  # c's delivery of them waits: it may still go (or be going): retired too
    sent = ix.job(job2).report["rejection_notes"]
    assert sent["a"] == sent["c"] == "sent" and sent["b"].startswith(NOT_SENT), sent
    assert f"job {job1}" in sent["b"] and "never had a delivery to b" in sent["b"], sent
    # the outbox now drops job 1's delivery to c (replaced by job 2's): never sent there
    (to_c,) = [d for d in ix.deliveries(job1) if d.destination == "c"]
    outbox.attempt(to_c)
    c = ix.delivery(to_c.id)
    assert c is not None and c.state == DeliveryState.DEAD_LETTER and c.reason.startswith(NOT_SENT), c
    # the last slice: job 3 retires job 2's results everywhere (their deliveries wait) and job 1's only at a
    _add(ctx, files[:1])
    job3 = ix.create_job(series, "all-ct-mr", study_uid=study)
    run_job(ctx2, job3)
    d2 = ix.job(job2).derived_series_uid
    notes = _notes(ctx, job3)
    assert notes == {"a": {d1, d2}, "b": {d2}, "c": {d2}}, notes
    sent = ix.job(job3).report["rejection_notes"]
    assert sent["a"] == "sent" and sent["b"] == sent["c"] == "sent", sent


def _config_of(tmp_path: Path, configured: list[str], destinations: list[str]) -> Config:
    raw = base_config(tmp_path)
    raw["destinations"] = [{"name": n, "kind": "folder", "path": str(tmp_path / n)} for n in configured]
    raw["rules"][0]["destinations"] = destinations
    return config_from_dict(raw)


def test_a_destination_the_rule_or_the_configuration_dropped_since_is_not_forgotten_by_the_note(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """hostile17: job 1's results delivered to a, b and c; then b removed from the configuration and c from the
    rule (still configured). Job 2 (a late slice) sent its rejection note to a alone: c and b kept job 1's
    derived series, current in appearance, retired by nothing, and nothing said so (the report named a only).
    Now c, still configured, gets the note alone; b, gone, is named in the report (``NOT_SENT``) and a WARNING."""
    files = write_phantom_series(tmp_path / "in", slices=8, size=32, step_mm=3.0, seed=1701)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series, study = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    ctx = JobContext.open(_config_of(tmp_path, ["a", "b", "c"], ["a", "b", "c"]))
    ix = ctx.store.index
    outbox = Outbox(ctx.cfg, ix, ctx.metrics)
    _add(ctx, files[1:])
    job1 = ix.create_job(series, "all-ct-mr", study_uid=study)
    run_job(ctx, job1)
    for d in ix.deliveries(job1):
        outbox.attempt(d)
        assert ix.delivery(d.id).state == DeliveryState.DELIVERED  # type: ignore[union-attr]
    ctx2 = dataclasses.replace(ctx, cfg=_config_of(tmp_path, ["a", "c"], ["a"]))
    _add(ctx, files[:1])
    job2 = ix.create_job(series, "all-ct-mr", study_uid=study)
    with caplog.at_level(logging.WARNING, logger="node.derived.iocm"):
        run_job(ctx2, job2)
    d1 = ix.job(job1).derived_series_uid
    assert ix.job(job2).state == JobState.SENDING
    notes = _notes(ctx, job2)
    assert notes == {"a": {d1}, "c": {d1}}, notes  # before: {"a": {d1}}
    (to_c,) = [d for d in ix.deliveries(job2) if d.destination == "c"]
    assert [pydicom.dcmread(f, stop_before_pixels=True).Modality for f in to_c.files] == ["KO"], to_c.files
    sent = ix.job(job2).report["rejection_notes"]
    assert sent["a"] == "sent" and sent["c"].startswith("sent alone: c is no longer a destination of the rule"), sent
    assert sent["b"].startswith(NOT_SENT) and f"job {job1}" in sent["b"] and "b, which is no longer configured" \
        in sent["b"], sent
    assert any("no longer configured" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # the note alone is delivered to c
    outbox2 = Outbox(ctx2.cfg, ix, ctx.metrics)
    outbox2.attempt(to_c)
    assert ix.delivery(to_c.id).state == DeliveryState.DELIVERED  # type: ignore[union-attr]
    assert [p.name for p in (tmp_path / "c").rglob("*.dcm") if pydicom.dcmread(p).Modality == "KO"], "no KO at c"
