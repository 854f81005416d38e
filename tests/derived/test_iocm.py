"""IOCM rejection notes: a reprocessed series retires the results already sent, also past jobs of the series that
produced nothing (superseded while still queued)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pydicom
import pytest

from models.engine import Factors
from node.app.phantom import write_phantom_series
from node.config import load_config
from node.derived import reject_superseded, result_revision
from node.derived.labels import series_number
from node.process import process_series
from node.store import Instance, JobState, open_store


def test_rejection_note_reaches_back_past_jobs_without_results(tmp_path: Path) -> None:
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, spool_dir=str(tmp_path / "spool")))
    store = open_store(cfg)
    files = write_phantom_series(tmp_path / "in", slices=5, size=32, step_mm=3.0)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    _index_files(store, files)
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


def _index_files(store: Any, files: list[Path]) -> None:
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        store.index.add_instance(Instance(sop_uid=ds.SOPInstanceUID, series_uid=ds.SeriesInstanceUID,
                                          study_uid=ds.StudyInstanceUID, sop_class=ds.SOPClassUID,
                                          transfer_syntax="1.2.840.10008.1.2.1", path=str(f), calling_ae="CT01",
                                          allowed_rules=""), "CT", f.stat().st_size)


def _run(store: Any, cfg: Any, job_id: int, series: str) -> tuple[int, int]:
    """As the runner does: the job's revision, its result, its report; returns (revision, SeriesNumber)."""
    job = store.index.job(job_id)
    paths = [Path(i.path) for i in store.index.instances_of(series)]
    revision = result_revision(store.index, job)
    res = process_series(paths, cfg.rules[0], cfg, store.spool.job_dir(job_id, fresh=True), engine_name="cubic",
                         revision=revision)
    rev = revision.of(res.derived_series_uid)
    store.index.finish_job(job_id, JobState.DELIVERED, derived_series_uid=res.derived_series_uid,
                           report={"revision": rev, "derived_series_uids": res.derived_series_uids})
    return rev, int(pydicom.dcmread(res.derived_files[0], stop_before_pixels=True).SeriesNumber)


def test_a_superseding_result_gets_another_series_number_and_a_replay_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, spool_dir=str(tmp_path / "spool")))
    store = open_store(cfg)
    files = write_phantom_series(tmp_path / "in", slices=6, size=32, step_mm=3.0)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    source = int(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesNumber)
    _index_files(store, files[:5])
    rev1, number1 = _run(store, cfg, store.index.create_job(series, "r"), series)
    _index_files(store, files[5:])  # a late instance: the series is processed again, the new job supersedes
    rev2, number2 = _run(store, cfg, store.index.create_job(series, "r"), series)
    rev3, number3 = _run(store, cfg, store.index.create_job(series, "r"), series)  # a replay: the same input
    # a replay whose UIDs differ (an upgrade changed PIPELINE_VERSION; other engine settings or weights alike)
    import node.derived.modules

    monkeypatch.setattr(node.derived.modules, "PIPELINE_VERSION", node.derived.modules.PIPELINE_VERSION + ".up")
    rev4, number4 = _run(store, cfg, store.index.create_job(series, "r"), series)
    assert (rev1, rev2, rev3, rev4) == (0, 1, 1, 2)
    assert number4 not in (number1, number2), "a result with other UIDs shows the number of the one it rejects"
    assert number2 != number1, "the superseding derived series shows the number of the one it supersedes"
    assert number3 == number2, "a replay of the same input (the same UIDs) must keep its number"
    offset = cfg.derive.series_number_offset
    assert number1 % offset == number2 % offset == source % offset  # the source number stays readable
    assert number2 // offset == number1 // offset % 99 + 1  # the next thousand
    # its uncertainty series (derived + 1, + 2) collide with neither result's numbers
    factors = Factors(cfg.rules[0].through_plane_factor, cfg.rules[0].in_plane_factor)
    for run in (1, 2):
        earlier = {series_number(source, offset, "selfsup", factors, run) + d for d in range(3)}
        later = {series_number(source, offset, "selfsup", factors, run, revision=1) + d for d in range(3)}
        assert not earlier & later


def test_a_replay_after_a_label_change_is_a_new_series_retiring_the_old_with_the_right_reason(tmp_path: Path) -> None:
    """[derive] caution changed, then the series replayed (same instances): a new series (new UIDs, another
    SeriesNumber) and a rejection note retiring the earlier one that names the settings, not late instances."""
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, spool_dir=str(tmp_path / "spool")))
    store = open_store(cfg)
    files = write_phantom_series(tmp_path / "in", slices=5, size=32, step_mm=3.0, seed=77)
    _index_files(store, files)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    job1 = store.index.create_job(series, "r")
    _, number1 = _run(store, cfg, job1, series)
    uid1 = store.index.job(job1).derived_series_uid
    relabelled = dataclasses.replace(cfg, derive=dataclasses.replace(cfg.derive, caution="research use only"))
    job2 = store.index.create_job(series, "r")
    _, number2 = _run(store, relabelled, job2, series)
    uid2 = store.index.job(job2).derived_series_uid
    assert uid2 != uid1 and number2 != number1
    (note,) = reject_superseded(store.index, store.spool.outbox, store.index.job(job2), uid2, relabelled.derive,
                                tmp_path / "out")
    text = pydicom.dcmread(note).ContentSequence[0].TextValue
    assert f"superseded by srnode job {job2} (series {uid2}): job {job1} made with other settings" in text, text


def test_a_label_changed_back_never_gives_uids_the_pacs_holds_other_content_under(tmp_path: Path) -> None:
    """rev14: [derive] caution changed, the series replayed, then changed back and replayed again. The third result
    took the first one's UIDs (the settings token is [] again) with the next revision's SeriesNumber: SOP Instance
    UIDs the PACS holds (and the second result's note rejected) sent again with other content. A result's UIDs
    must never come back with another SeriesNumber: either the same UIDs and numbers, or new UIDs."""
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, spool_dir=str(tmp_path / "spool")))
    store = open_store(cfg)
    files = write_phantom_series(tmp_path / "in", slices=5, size=32, step_mm=3.0, seed=78)
    _index_files(store, files)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    relabelled = dataclasses.replace(cfg, derive=dataclasses.replace(cfg.derive, caution="research use only"))
    made: list[tuple[str, int]] = []
    for c in (cfg, relabelled, cfg):
        job = store.index.create_job(series, "r")
        _, number = _run(store, c, job, series)
        made.append((store.index.job(job).derived_series_uid, number))
    numbers: dict[str, set[int]] = {}
    for uid, number in made:
        numbers.setdefault(uid, set()).add(number)
    assert all(len(n) == 1 for n in numbers.values()), made


def test_settings_changed_back_reissue_the_uids_the_rejection_note_retired(tmp_path: Path) -> None:
    """open16: a series processed with settings A, then B (A's results retired by B's rejection note), then A again.
    The third result took the first one's UIDs again (the same input and settings): a PACS that took B's note holds
    those SOP Instance UIDs as "Rejected for Quality Reasons", so the live result would be hidden or refused there.
    Now the third result gets new UIDs (a counter in their entropy) and its DerivationDescription says "UIDs
    reissued (1)"; a fourth, B again, reissues B's, and a fifth, A again, takes the next counter."""
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, spool_dir=str(tmp_path / "spool")))
    store = open_store(cfg)
    files = write_phantom_series(tmp_path / "in", slices=5, size=32, step_mm=3.0, seed=1602)
    _index_files(store, files)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    relabelled = dataclasses.replace(cfg, derive=dataclasses.replace(cfg.derive, caution="research use only"))
    made: list[tuple[str, set[str], str]] = []  # per run: derived series UID, its SOP Instance UIDs, derivation
    for c in (cfg, relabelled, cfg, relabelled, cfg):
        job = store.index.create_job(series, "r")
        _run(store, c, job, series)
        out = sorted(store.spool.job_dir(job).glob("**/*.dcm"))
        heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in out if not p.name.startswith("KO-")]
        heads = [h for h in heads if h.SeriesInstanceUID == store.index.job(job).derived_series_uid]
        made.append((store.index.job(job).derived_series_uid, {h.SOPInstanceUID for h in heads},
                     str(heads[0].DerivationDescription)))
    uids = [m[0] for m in made]
    assert len(set(uids)) == 5, uids  # before: runs 3 and 5 took run 1's UIDs, run 4 run 2's
    for i, (_, sops, _) in enumerate(made):
        for _, other, _ in made[:i]:
            assert not sops & other, "SOP Instance UIDs of a retired result made again"
    said = [m[2] for m in made]
    assert "UIDs reissued" not in said[0] and "UIDs reissued" not in said[1], said
    assert "UIDs reissued (1)" in said[2] and "UIDs reissued (1)" in said[3], said
    assert "UIDs reissued (2)" in said[4], said
