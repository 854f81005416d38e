"""A pull is all or nothing per series (pull14): ``srnode fetch`` / ``POST /jobs`` from an Orthanc REST or a
DICOMweb source that fails part-way admits none of the series (staged in the spool's incoming/, the one staging
path the changes follower uses too), names the series by UID and is retried whole; the changes follower skips a
malformed change with one warning and keeps its position durably. Real Orthanc, a proxy in front of it breaking
one answer."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pydicom
import pytest

from node.errors import NodeError
from node.store import Index
from tests.support.pacs import api, orthanc_dicomweb, phantom, start_node, upload, wait_job
from tests.support.peers import FaultyProxy, start_orthanc, wait_until


def _store(tmp_path: Path, source: dict[str, object]) -> tuple[object, object, object]:
    from node.config import config_from_dict
    from node.ingest import Admission
    from node.metrics import Metrics
    from node.store import open_store

    cfg = config_from_dict({"node": {"spool_dir": str(tmp_path / "spool")}, "sources": [
        {"name": "o", "kind": "orthanc", **source}]})
    store = open_store(cfg)
    return cfg, store, Admission(cfg, store.spool, store.index, Metrics.create())


def test_a_fetch_from_orthanc_that_fails_midway_admits_nothing_of_the_series(tmp_path: Path) -> None:
    """Before: ``fetch`` admitted each instance as it came; Orthanc answering 500 on the 4th of 6 files left 3 in
    the index (the caller got a 502, but once quiet for stable_age_s they made a job from half the series). Now:
    none admitted, the staging removed, the error names the series by UID (no patient value); a retry pulls it
    whole and declares 6."""
    from node.ingest import fetch

    orthanc = start_orthanc(tmp_path / "orthanc")
    files = phantom(tmp_path, seed=1401, slices=6)
    upload(orthanc, files)
    ref = pydicom.dcmread(files[0], stop_before_pixels=True)
    broken = [True]

    def fault(method: str, path: str, n: int) -> str | None:
        return "500" if n == 4 and broken[0] else None

    with FaultyProxy(orthanc.url, fault) as proxy:
        cfg, store, admission = _store(tmp_path, {"url": proxy.url})
        try:
            with pytest.raises(NodeError) as err:
                fetch(cfg, "o", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission)  # type: ignore[arg-type]
            row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined]
            assert row is None, row  # before: n_instances 3
            text = str(err.value)
            assert ref.SeriesInstanceUID in text and "none of it admitted" in text and "3 instance(s) read" in text
            assert "HTTP 500" in text, text
            for value in (ref.PatientName, ref.PatientID, ref.get("StudyDate", "")):
                assert not str(value) or str(value) not in text
            assert list((tmp_path / "spool" / "incoming").iterdir()) == []
            broken[0] = False
            result = fetch(cfg, "o", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission)  # type: ignore[arg-type]
            assert result.received == 6 and not result.refused
            row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined]
            assert row is not None and (row["n_instances"], row["declared_instances"]) == (6, 6), row
            assert list((tmp_path / "spool" / "incoming").iterdir()) == []
        finally:
            store.index.close()  # type: ignore[attr-defined]
            orthanc.stop()


def test_a_wado_rs_pull_cut_midway_through_post_jobs_admits_nothing(tmp_path: Path) -> None:
    """``POST /jobs`` from a DICOMweb source whose WADO-RS answer breaks off half-way (the connection closed after
    half the multipart body): before, the instances parsed before the break were admitted (a job from part of the
    series after stable_age_s); now 502 naming the series, nothing of it in the node's index, and the retry pulls
    it whole."""
    orthanc = orthanc_dicomweb(tmp_path / "orthanc")
    files = phantom(tmp_path, seed=1402, slices=6)
    upload(orthanc, files)
    ref = pydicom.dcmread(files[0], stop_before_pixels=True)
    cuts: list[str] = []

    def fault(method: str, path: str, n: int) -> str | None:
        if f"/series/{ref.SeriesInstanceUID}" in path and "metadata" not in path and not cuts:
            cuts.append(path)
            return "cut"
        return None

    with FaultyProxy(orthanc.url, fault) as proxy:
        node = start_node(tmp_path / "node", {"sources": [
            {"name": "web", "kind": "dicomweb", "url": f"{proxy.url}/dicom-web"}]})
        try:
            with api(node) as c:
                r = c.post("/jobs", json={"study": ref.StudyInstanceUID, "series": ref.SeriesInstanceUID,
                                          "source": "web"})
                assert cuts and r.status_code == 502, (r.status_code, r.text)
                ix = Index(node.spool / "index.sqlite")
                try:
                    row = ix.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)
                    assert row is None, row
                finally:
                    ix.close()
                assert ref.SeriesInstanceUID in r.json()["error"] and "none of it admitted" in r.json()["error"]
                assert [p for p in (node.spool / "incoming").iterdir() if p.name.startswith("pull-")] == []
                r = c.post("/jobs", json={"study": ref.StudyInstanceUID, "series": ref.SeriesInstanceUID,
                                          "source": "web"})
                assert r.status_code == 202 and r.json()["received"] == 6, r.text
            job = wait_job(node, ref.SeriesInstanceUID)
            assert job["state"] == "delivered" and job["n_instances"] == 6, job
        finally:
            node.stop()
            orthanc.stop()


def test_a_malformed_change_is_skipped_with_one_warning_and_the_feed_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a change without its ``ID`` or ``Seq`` (or not an object) raised in the loop: the follower stayed at
    that change, a warning every poll_s, and no later series was ever pulled. Now each is skipped with one warning
    naming its position (and that the series it told of, if any, is not pulled); the series after it are pulled
    and the position saved past it."""
    orthanc = start_orthanc(tmp_path / "orthanc")
    uploaded = []
    for seed in (1403, 1404):
        files = phantom(tmp_path, seed=seed, slices=3)
        upload(orthanc, files)
        uploaded.append(pydicom.dcmread(files[0], stop_before_pixels=True))
    ids = orthanc.get("/series")
    polls: list[str] = []

    def fault(method: str, path: str, n: int) -> bytes | None:
        if not path.startswith("/changes"):
            return None
        polls.append(path)
        if "since=0" not in path:
            return json.dumps({"Changes": [], "Done": True, "Last": 6}).encode()
        return json.dumps({"Changes": [
            {"ChangeType": "StableSeries", "Seq": 1},  # no ID: that series cannot be pulled
            "maintenance",  # not an object
            {"ChangeType": "StableSeries", "ID": ids[0], "Seq": "3"},  # Seq of another type: pulled all the same
            {"ChangeType": "StableSeries", "ID": 42, "Seq": 4},
            {"ChangeType": "NewInstance", "ID": "x", "Seq": 5},
            {"ChangeType": "StableSeries", "ID": ids[1], "Seq": 6},
        ], "Done": True, "Last": 6}).encode()

    from tests.ingest.test_pull import _follower

    with FaultyProxy(orthanc.url, fault) as proxy:
        follower, store = _follower(tmp_path, {"url": proxy.url})
        caplog.set_level(logging.WARNING, logger="node.ingest.follower")
        follower.start()  # type: ignore[attr-defined]
        try:
            wait_until(lambda: sum("since=6" in p for p in polls) >= 3, 60, what="the follower polling past Seq 6")
            for ref in uploaded:
                row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined]
                assert row is not None and row["n_instances"] == 3, row
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 4, warnings  # one a malformed change, never repeated
            assert any("change Seq 1" in w and "not pulled" in w for w in warnings), warnings
            assert any("change 2 of the page read after Seq" in w and "not an object" in w for w in warnings)
            assert any("no integer Seq" in w and "its series pulled" in w for w in warnings), warnings
            assert any("change Seq 4" in w and "no usable ID" in w for w in warnings), warnings
            assert json.loads((tmp_path / "spool" / "changes-o.json").read_text()) == {"since": 6}
        finally:
            follower.stop()  # type: ignore[attr-defined]
            store.index.close()  # type: ignore[attr-defined]
            orthanc.stop()


def test_the_feed_position_is_written_atomically_and_durably(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``_save`` wrote a temporary file and renamed it without an fsync of either: after a power cut the
    position could be empty (then read from the feed's end: series missed). Now the file's data and the folder
    are fsync'ed (node.store.atomic_write); no temporary file is left."""
    from tests.ingest.test_pull import _follower

    follower, store = _follower(tmp_path, {"url": "http://127.0.0.1:9"})
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        follower._save(1234)  # type: ignore[attr-defined]
        state = tmp_path / "spool" / "changes-o.json"
        assert json.loads(state.read_text()) == {"since": 1234}
        assert sorted(p.name for p in state.parent.iterdir() if "changes" in p.name or "part" in p.name) == [
            "changes-o.json"]
        assert str(state.parent) in synced, synced  # the rename is durable
        assert any(Path(p).parent == state.parent and p != str(state.parent) for p in synced), synced  # the data
    finally:
        store.index.close()  # type: ignore[attr-defined]


def _one_the_node_cannot_take(tmp_path: Path, seed: int) -> tuple[list[Path], pydicom.Dataset]:
    """A series of 6 whose 4th instance is of a SOP class no storage context of the node offers (a private one):
    the PACS stores it, and fails that one sub-operation of a C-MOVE / C-GET to the node."""
    files = phantom(tmp_path, seed=seed, slices=6)
    ds = pydicom.dcmread(files[3])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.10.1087.99.1"
    ds.save_as(files[3])
    return files, pydicom.dcmread(files[0], stop_before_pixels=True)


def test_a_c_move_with_failed_sub_operations_marks_its_series_incomplete(tmp_path: Path) -> None:
    """A C-MOVE of a series that fails on its 4th instance (Orthanc: status 0xC000, no sub-operation counts, the
    instances it sent before through the node's SCP). Before: exit 1 and no declaration: once quiet, what came
    made a job that looked complete. Now the series is declared with the size the PACS gives (sub-operation
    counts, else NumberOfSeriesRelatedInstances by C-FIND: 6), by this C-MOVE's status, so it never completes
    early and its job says INCOMPLETE naming the C-MOVE (``srnode status``)."""
    from tests.support.peers import free_port

    node_port = free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", modalities={"SRNODE": ["SRNODE", "127.0.0.1", node_port]})
    node = start_node(tmp_path / "node", {"node": {"port": node_port}, "sources": [
        {"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]})
    try:
        files, ref = _one_the_node_cannot_take(tmp_path, 1405)
        upload(orthanc, files)
        r = node.cli("fetch", "--from", "pacs", "--study", ref.StudyInstanceUID, "--series", ref.SeriesInstanceUID)
        assert r.returncode != 0, r.stdout
        assert "INCOMPLETE" in r.stderr and ref.SeriesInstanceUID in r.stderr, r.stderr
        ix = Index(node.spool / "index.sqlite")
        try:
            row = ix.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)
            assert row is not None and row["n_instances"] < 6 and row["declared_instances"] == 6, row
            assert "c-move from pacs ended with status 0xC000" in row["declared_by"], row
            came = row["n_instances"]
        finally:
            ix.close()
        job = wait_job(node, ref.SeriesInstanceUID)
        st = node.cli("status")
        assert f"INCOMPLETE: made from {came} of the 6" in st.stdout and "c-move from pacs" in st.stdout, st.stdout
        assert job["n_instances"] == came
    finally:
        node.stop()
        orthanc.stop()


def test_a_c_get_with_failed_sub_operations_admits_nothing_of_the_series(tmp_path: Path) -> None:
    """A C-GET of a series that fails on its 4th instance (Orthanc: status 0xC000, 1 sub-operation failed): before,
    the instances stored on the same association before it were admitted as they came (a job from part of the
    series after the quiet period); now none, the error names the series and how many were read."""
    from node.config import config_from_dict
    from node.ingest import Admission, fetch
    from node.metrics import Metrics
    from node.store import open_store

    orthanc = orthanc_dicomweb(tmp_path / "orthanc", modalities={"SRNODE": ["SRNODE", "127.0.0.1", 11112]})
    try:
        files, ref = _one_the_node_cannot_take(tmp_path, 1406)
        upload(orthanc, files)
        cfg = config_from_dict({"node": {"spool_dir": str(tmp_path / "spool")}, "sources": [
            {"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
             "port": orthanc.dicom_port}]})
        store = open_store(cfg)
        admission = Admission(cfg, store.spool, store.index, Metrics.create())
        with pytest.raises(NodeError) as err:
            fetch(cfg, "pacs", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission, method="get")
        assert store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID) is None
        assert ref.SeriesInstanceUID in str(err.value) and "none of it admitted" in str(err.value), err.value
        assert list((tmp_path / "spool" / "incoming").iterdir()) == []
        store.index.close()
    finally:
        orthanc.stop()


@pytest.mark.parametrize("kind", ["orthanc", "dicomweb", "c-get"])
def test_a_pulled_series_with_one_instance_admission_refuses_is_refused_whole(tmp_path: Path, kind: str) -> None:
    """A pull (Orthanc REST, WADO-RS, C-GET) of a series whose 4th instance admission refuses (a CT image without
    pixel data: the PACS holds it and sends it, the node cannot take it). Before: the other 5 were admitted (no size
    declared, the refusal listed): once quiet, a job made from 5 of the 6 (a slice dropped without a word in the
    derived series). Now the series is refused whole: nothing of it in the index, one refusal naming the series by
    UID and the instance's reason, the staging removed."""
    from node.ingest import fetch

    orthanc = orthanc_dicomweb(tmp_path / "orthanc", modalities={"SRNODE": ["SRNODE", "127.0.0.1", 11112]})
    files = phantom(tmp_path, seed=1407, slices=6)
    ds = pydicom.dcmread(files[3])
    del ds.PixelData
    ds.save_as(files[3])
    upload(orthanc, files)
    ref = pydicom.dcmread(files[0], stop_before_pixels=True)
    source: dict[str, object] = {
        "orthanc": {"kind": "orthanc", "url": orthanc.url},
        "dicomweb": {"kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"},
        "c-get": {"kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}}[kind]
    cfg, store, admission = _store(tmp_path, source)
    try:
        result = fetch(cfg, "o", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission,  # type: ignore[arg-type]
                       method="get" if kind == "c-get" else "")
        row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined]
        assert row is None, row  # before: n_instances 5
        assert result.received == 0 and len(result.refused) == 1, result
        (why,) = result.refused
        assert ref.SeriesInstanceUID in why and "refused whole" in why and "without pixel data" in why, why
        assert "1 of 6" in why, why
        assert list((tmp_path / "spool" / "incoming").iterdir()) == []
    finally:
        store.index.close()  # type: ignore[attr-defined]
        orthanc.stop()


@pytest.mark.parametrize("kind", ["orthanc", "dicomweb"])
def test_a_pulled_series_with_a_private_non_image_object_is_admitted_without_it(tmp_path: Path, kind: str) -> None:
    """break16: a series of 6 slices with a 7th instance of a private SOP class without pixel data (as Philips MR
    series hold their Private MR Series Data / ExamCard objects, Siemens their CSA Non-Image ones). No storage
    context of the node takes it, however it comes (C-STORE: 0x0122 for it, the slices stored and processed). Since
    open16 a pull refused the series whole ('1 of 7 instance(s) refused by admission': no slice of it admitted, the
    series never processed), although that object is no slice of it. Now it alone is refused, named, and the 6
    slices are admitted. A private instance with pixel data (it may be a slice) still refuses its series whole
    (``test_a_c_get_with_failed_sub_operations_admits_nothing_of_the_series``'s object, pulled by REST)."""
    from node.ingest import fetch

    orthanc = orthanc_dicomweb(tmp_path / "orthanc")
    files, private, ref = _series_with_private_non_image(tmp_path, 1408)
    upload(orthanc, [*files, private])
    source: dict[str, object] = {"orthanc": {"kind": "orthanc", "url": orthanc.url},
                                 "dicomweb": {"kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"}}[kind]
    cfg, store, admission = _store(tmp_path, source)
    try:
        result = fetch(cfg, "o", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission)  # type: ignore[arg-type]
        row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined]
        assert row is not None and row["n_instances"] == 6, (row, result.refused)  # before: None, refused whole
        assert result.received == 6 and len(result.refused) == 1, result
        (why,) = result.refused
        uid = pydicom.dcmread(private, stop_before_pixels=True).SOPInstanceUID
        assert uid in why and "not a storage SOP class" in why and "refused whole" not in why, why
        assert list((tmp_path / "spool" / "incoming").iterdir()) == []
    finally:
        store.index.close()  # type: ignore[attr-defined]
        orthanc.stop()


def test_a_pulled_private_instance_with_pixel_data_still_refuses_its_series_whole(tmp_path: Path) -> None:
    """The other side of the test above: the 4th slice stored under a private SOP class (pixel data, a position):
    it may be a slice of the series, so an Orthanc REST pull refuses the series whole, as before."""
    from node.ingest import fetch

    orthanc = orthanc_dicomweb(tmp_path / "orthanc")
    files, ref = _one_the_node_cannot_take(tmp_path, 1409)
    upload(orthanc, files)
    cfg, store, admission = _store(tmp_path, {"kind": "orthanc", "url": orthanc.url})
    try:
        result = fetch(cfg, "o", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission)  # type: ignore[arg-type]
        assert store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID) is None  # type: ignore[attr-defined]
        assert result.received == 0 and len(result.refused) == 1 and "refused whole" in result.refused[0], result
    finally:
        store.index.close()  # type: ignore[attr-defined]
        orthanc.stop()


def test_a_pull_whose_admission_fails_after_part_of_the_series_is_in_is_declared_not_silent(tmp_path: Path) -> None:
    """hostile17: every staged instance passed ``Admission.check_file``, then committing them failed part-way (here
    the index refuses the 5th and 6th rows of the series; in the field a disk reaching ``min_free_mb`` between two
    commits, an fsync failing, a write lock held past the busy timeout). Before: the SpoolError escaped ``fetch``
    with 4 of the 6 instances already in the index, nothing declared: once quiet for stable_age_s a job from 4 of
    the 6 slices, its derived series complete in appearance. Now every refusal of the commit is listed, naming the
    series, and the series is declared with the 6 instances the source sent: its job says INCOMPLETE; a retry
    that brings the rest makes it whole (6 of 6 declared)."""
    import sqlite3

    from node.ingest import fetch

    orthanc = start_orthanc(tmp_path / "orthanc")
    files = phantom(tmp_path, seed=1701, slices=6)
    upload(orthanc, files)
    ref = pydicom.dcmread(files[0], stop_before_pixels=True)
    cfg, store, admission = _store(tmp_path, {"url": orthanc.url})
    db = sqlite3.connect(tmp_path / "spool" / "index.sqlite", timeout=60, isolation_level=None)
    try:
        db.execute("CREATE TRIGGER refuse_late BEFORE INSERT ON instances WHEN (SELECT count(*) FROM instances WHERE "
                   "series_uid = NEW.series_uid) >= 4 BEGIN SELECT RAISE(ABORT, 'test: the index refuses the row'); "
                   "END")
        result = fetch(cfg, "o", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission)  # type: ignore[arg-type]
        row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined]
        assert row is not None and row["n_instances"] == 4, row
        assert row["declared_instances"] == 6, row  # before: None (and SpoolError out of fetch)
        assert result.received == 4 and len(result.refused) == 1, result
        text = result.refused[0]
        assert ref.SeriesInstanceUID in text and "2 of 6" in text and "INCOMPLETE" in text, text
        for value in (ref.PatientName, ref.PatientID, ref.get("StudyDate", "")):
            assert not str(value) or str(value) not in text
        assert list((tmp_path / "spool" / "incoming").iterdir()) == []
        db.execute("DROP TRIGGER refuse_late")
        result = fetch(cfg, "o", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission)  # type: ignore[arg-type]
        assert result.received == 6 and not result.refused, result
        row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined]
        assert row is not None and (row["n_instances"], row["declared_instances"]) == (6, 6), row
    finally:
        db.close()
        store.index.close()  # type: ignore[attr-defined]
        orthanc.stop()


def test_the_follower_pulls_again_a_series_it_could_store_only_in_part(tmp_path: Path) -> None:
    """hostile17: the changes follower's commit fails after 4 of 6 instances of a stable series (the index refuses
    the rest). Before the Staging fix the SpoolError ended the round (and the feed position stayed); once a part
    stored is declared rather than raised, the follower must not move past the series as if done: it pulls it
    again next round, the feed position kept, and once the index takes the rest the series is whole (6, declared
    6 by the follower)."""
    import sqlite3

    from tests.ingest.test_pull import _follower

    orthanc = start_orthanc(tmp_path / "orthanc")
    follower, store = _follower(tmp_path, {"url": orthanc.url})
    db = sqlite3.connect(tmp_path / "spool" / "index.sqlite", timeout=60, isolation_level=None)
    try:
        db.execute("CREATE TRIGGER refuse_late BEFORE INSERT ON instances WHEN (SELECT count(*) FROM instances WHERE "
                   "series_uid = NEW.series_uid) >= 4 BEGIN SELECT RAISE(ABORT, 'test: the index refuses the row'); "
                   "END")
        files = phantom(tmp_path, seed=1702, slices=6)
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        upload(orthanc, files)
        follower.start()  # type: ignore[attr-defined]

        def row() -> dict[str, object] | None:
            return store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)  # type: ignore[attr-defined,no-any-return]

        wait_until(lambda: (r := row()) is not None and (r["n_instances"], r["declared_instances"]) == (4, 6), 60,
                   what=f"4 of 6 stored, 6 declared ({row()})")
        db.execute("DROP TRIGGER refuse_late")
        wait_until(lambda: (r := row()) is not None and (r["n_instances"], r["declared_instances"]) == (6, 6)
                   and str(r["declared_by"]).startswith("orthanc-changes"), 60,
                   what=f"the series pulled again, whole ({row()})")
    finally:
        if follower is not None:
            follower.stop()  # type: ignore[attr-defined]
        db.close()
        store.index.close()  # type: ignore[attr-defined]
        orthanc.stop()


def _series_with_private_non_image(tmp_path: Path, seed: int) -> tuple[list[Path], Path, pydicom.Dataset]:
    """6 slices and, uploaded last, a Philips private non-image object (SOP class 1.3.46.670589.11.0.0.12.2, no
    pixel data, no image attributes) of the same series."""
    files = phantom(tmp_path, seed=seed, slices=6)
    ds = pydicom.dcmread(files[0])
    del ds.PixelData
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "SamplesPerPixel", "PhotometricInterpretation", "ImagePositionPatient", "ImageOrientationPatient"):
        if kw in ds:
            delattr(ds, kw)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.3.46.670589.11.0.0.12.2"  # Philips series data
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    private = tmp_path / "private.dcm"
    ds.save_as(private, enforce_file_format=True)
    return files, private, pydicom.dcmread(files[0], stop_before_pixels=True)


def test_a_c_move_of_a_series_with_a_private_non_image_object_is_complete(tmp_path: Path) -> None:
    """hostile18: a C-MOVE of 6 slices + a Philips private non-image object (no storage context of the node takes
    it: Orthanc fails that one sub-operation). Before: the C-MOVE 'ended with status 0xC000', the series declared 7
    by that status and its job 'INCOMPLETE: made from 6 of the 7', exit 1, although every slice came. Now the
    failed sub-operations are matched by an IMAGE-level C-FIND of the series: the only instances that did not come
    are objects of a SOP class the node does not take and without Rows (no image): the series is declared its 6
    slices, exit 0, the object named as refused."""
    from tests.support.peers import free_port

    node_port = free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", modalities={"SRNODE": ["SRNODE", "127.0.0.1", node_port]})
    node = start_node(tmp_path / "node", {"node": {"port": node_port}, "sources": [
        {"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]})
    try:
        files, private, ref = _series_with_private_non_image(tmp_path, 1801)
        upload(orthanc, [private, *files])  # Orthanc 1.10 moves it last, once the slices are sent, then 0xC000
        r = node.cli("fetch", "--from", "pacs", "--study", ref.StudyInstanceUID, "--series", ref.SeriesInstanceUID)
        assert r.returncode == 1, (r.stdout, r.stderr)  # as any refused instance (the Orthanc REST pull's too)
        assert "INCOMPLETE" not in r.stderr + r.stdout and "0xC000" in r.stderr, r.stderr
        assert "1.3.46.670589.11.0.0.12.2" in r.stderr + r.stdout, (r.stdout, r.stderr)
        ix = Index(node.spool / "index.sqlite")
        try:
            row = ix.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)
            assert row is not None and row["n_instances"] == 6 and row["declared_instances"] == 6, row
        finally:
            ix.close()
        wait_job(node, ref.SeriesInstanceUID)
        st = node.cli("status")
        assert "INCOMPLETE" not in st.stdout, st.stdout
    finally:
        node.stop()
        orthanc.stop()


def test_a_c_get_of_a_series_with_a_private_non_image_object_admits_its_slices(tmp_path: Path) -> None:
    """hostile18: the same series by C-GET. Before: the C-GET 'failed part-way' (0xC000, 1 sub-operation failed)
    and none of the 6 slices was admitted. Now the failed sub-operation is matched to the private non-image object
    by a C-FIND: the 6 slices are admitted and declared, the object listed as refused."""
    from node.config import config_from_dict
    from node.ingest import Admission, fetch
    from node.metrics import Metrics
    from node.store import open_store

    orthanc = orthanc_dicomweb(tmp_path / "orthanc", modalities={"SRNODE": ["SRNODE", "127.0.0.1", 11112]})
    try:
        files, private, ref = _series_with_private_non_image(tmp_path, 1802)
        upload(orthanc, [private, *files])
        cfg = config_from_dict({"node": {"spool_dir": str(tmp_path / "spool")}, "sources": [
            {"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
             "port": orthanc.dicom_port}]})
        store = open_store(cfg)
        admission = Admission(cfg, store.spool, store.index, Metrics.create())
        result = fetch(cfg, "pacs", ref.StudyInstanceUID, ref.SeriesInstanceUID, admission=admission, method="get")
        row = store.index.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)
        assert row is not None and row["n_instances"] == 6 and row["declared_instances"] == 6, (row, result)
        assert result.received == 6 and len(result.refused) == 1, result
        assert "1.3.46.670589.11.0.0.12.2" in result.refused[0], result.refused
        assert list((tmp_path / "spool" / "incoming").iterdir()) == []
        store.index.close()
    finally:
        orthanc.stop()
