"""The real node process end to end: storescu -> srnode -> a real Orthanc (or a folder), status, restart."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from node.app.phantom import write_phantom_series
from node.store import Index
from tests.support.fixtures import shared_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import STORESCU, Orthanc, storescu, wait_until


def _done(jobs: list[dict], n: int) -> bool:
    return len([j for j in jobs if j["state"] in ("delivered", "failed", "dead-letter", "ignored")]) >= n


def _pacs(orthanc: Orthanc) -> dict:
    return {"destinations": [{"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
                              "port": orthanc.dicom_port}],
            "rules": [{"name": "ct-x2", "match": {"Modality": "CT"}, "through_plane_factor": 2,
                       "destinations": ["pacs"]}]}


def test_series_from_storescu_arrive_in_orthanc(tmp_path: Path, orthanc: Orthanc) -> None:
    orthanc.clear()
    thick = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"))
    generated = write_phantom_series(tmp_path / "gen", slices=6, size=64, step_mm=3.0)
    sections = _pacs(orthanc)
    # the small generated series through selfsup (fast, 1 pass; kept whatever its gain): its sigma goes to Orthanc
    # as a Parametric Map and an SC card ("both"); the thick one through cubic, which has no sigma and sends none
    sections["rules"].insert(0, {"name": "phantom-selfsup", "match": {"SeriesDescription": "Head phantom.*"},
                                 "through_plane_factor": 2, "engine": "selfsup", "destinations": ["pacs"]})
    sections["engine"] = {"fast": True, "tta_passes": 1, "samples": 2, "min_gain_db": -100.0}
    sections["derive"] = {"uncertainty": "both"}
    with NodeProc.start(tmp_path / "node", sections) as node:
        for files in (thick, generated):
            r = storescu(files, node.port)
            assert r.returncode == 0, r.stderr
        jobs = node.wait_jobs(lambda js: _done(js, 2), timeout=240, what="both series delivered")
        assert [j["state"] for j in jobs] == ["delivered", "delivered"], json.dumps(jobs, indent=1)
        status = node.cli("status")
        assert status.returncode == 0 and status.stdout.count("delivered") >= 2
        statuses = node.status_cli()
        assert [j["state"] for j in statuses] == ["delivered", "delivered"]
        log = node.log()
    by_series = {j["series"]: j for j in statuses}
    for files, with_sigma in ((thick, False), (generated, True)):
        first = dcmread(files[0], stop_before_pixels=True)
        n_out = (len(files) - 1) * 2 + 1
        series = orthanc.series_of_study(first.StudyInstanceUID)
        got = sorted((s["MainDicomTags"].get("Modality", ""), len(s["Instances"])) for s in series)
        # derived CT (+ the Parametric Map and the card, modality OT each, for the engine with sigma), same study
        assert got == ([("CT", n_out), ("OT", 1), ("OT", 1)] if with_sigma else [("CT", n_out)]), got
        derived = next(s for s in series if s["MainDicomTags"]["Modality"] == "CT")
        assert derived["MainDicomTags"]["SeriesInstanceUID"] != first.SeriesInstanceUID
        job = by_series[first.SeriesInstanceUID]
        assert bool(job["uncertainty_series"]) == with_sigma, job  # no sigma series claimed for cubic
        if with_sigma:
            sigma = next(s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] == job["uncertainty_series"])
            pm = orthanc.instance_file(sigma["Instances"][0])
            (card_series,) = [s for s in series if s["MainDicomTags"]["Modality"] == "OT" and s is not sigma]
            card = orthanc.instance_file(card_series["Instances"][0])
            assert card.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and card.PhotometricInterpretation == "RGB"
            assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and int(pm.NumberOfFrames) == n_out
            assert pm.pixel_array.dtype == np.float32 and np.isfinite(pm.pixel_array).all()
            assert float(pm.pixel_array.max()) > 0  # selfsup's sigma, not zeros
            assert pm.FrameOfReferenceUID == first.FrameOfReferenceUID
    # no patient identifiers in the node's log
    for files in (thick, generated):
        h = dcmread(files[0], stop_before_pixels=True)
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(h.get(kw, "") or "")
            if len(value) >= 4:
                assert value not in log, f"{kw} appears in the node log"


def test_folder_destination_unmatched_series_and_restart(tmp_path: Path) -> None:
    ct = write_phantom_series(tmp_path / "ct", slices=5, size=64, step_mm=4.0, seed=1)
    other = write_phantom_series(tmp_path / "other", slices=3, size=32, step_mm=2.0, seed=2)
    for p in other:  # a series no rule matches: recorded and left alone
        ds = dcmread(p)
        ds.SeriesDescription = "SCOUT"
        ds.save_as(p)
    sections = {"rules": [{"name": "ct", "match": {"Modality": "CT", "SeriesDescription": "(?!SCOUT).*"},
                           "destinations": ["out"], "forward_originals": True}]}
    with NodeProc.start(tmp_path / "node", sections) as node:
        assert storescu([*ct, *other], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: _done(js, 2), timeout=120, what="one delivered, one ignored")
        by_series = {j["series"]: j for j in jobs}
        first = dcmread(ct[0], stop_before_pixels=True)
        job = by_series[first.SeriesInstanceUID]
        assert job["state"] == "delivered"
        ignored = by_series[dcmread(other[0], stop_before_pixels=True).SeriesInstanceUID]
        assert ignored["state"] == "ignored" and ignored["reason"].startswith("no rule matched")
        out = node.workdir / "out" / first.StudyInstanceUID
        files = {d.name: sorted(d.glob("*.dcm")) for d in out.iterdir()}
        assert sorted(len(v) for v in files.values()) == [5, 9]  # originals forwarded, derived (cubic: no sigma)
        assert len(files[first.SeriesInstanceUID]) == 5
        assert files[job["derived_series"]][0].name.endswith(".dcm")
        # a late instance after processing: the series is processed again and the new job supersedes
        late = write_phantom_series(tmp_path / "late", slices=6, size=64, step_mm=4.0, seed=1)[-1]
        ds = dcmread(late)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
        ds.FrameOfReferenceUID = first.FrameOfReferenceUID
        ds.save_as(late)
        assert storescu([late], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: _done(js, 3), timeout=120, what="reprocess after a late instance")
        again = [j for j in jobs if j["series"] == first.SeriesInstanceUID][-1]
        assert again["supersedes"] == job["id"] and again["instances"] == 6 and again["state"] == "delivered"

        # restart with a job in hand: kill -9 while it is queued or processing, start again, it completes
        more = write_phantom_series(tmp_path / "more", slices=20, size=256, step_mm=3.0, seed=3)
        assert storescu(more, node.port).returncode == 0
        index = Index(node.spool / "index.sqlite")
        wait_until(lambda: [j for j in index.jobs(("queued", "processing")) if j.id == 4], timeout=60,
                   interval=0.01, what="the new job queued")
        node.kill9()
        assert index.job(4).state in ("queued", "processing")
        node.launch()
        jobs = node.wait_jobs(lambda js: _done(js, 4), timeout=120, what="the interrupted job finished")
        assert jobs[-1]["state"] == "delivered", jobs[-1]
        first_more = dcmread(more[0], stop_before_pixels=True)
        out_more = node.workdir / "out" / first_more.StudyInstanceUID
        assert sorted(len(list(d.glob("*.dcm"))) for d in out_more.iterdir()) == [20, 39]  # cubic: no sigma
        assert node.stop() == 0
    audit = [json.loads(x) for x in (node.spool / "audit.log").read_text().splitlines()]
    assert {"association", "job-decision", "job-processed", "delivery"} <= {a["event"] for a in audit}


def test_sigterm_lets_stores_in_flight_finish(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=60, size=256, seed=4)
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 60.0}})
    sender = subprocess.Popen([STORESCU, "-aec", node.ae_title, "-aet", "SCANNER", "127.0.0.1", str(node.port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    index = Index(node.spool / "index.sqlite")
    wait_until(lambda: index.count_instances() >= 1, timeout=30, what="the first instance stored")
    assert node.stop() == 0  # SIGTERM while the association is open
    out, _ = sender.communicate(timeout=60)
    assert sender.returncode == 0, out  # every store answered Success ...
    assert index.count_instances() == len(files)  # ... and every one of them is in the spool
    assert "stopped" in node.log()
    with pytest.raises(AssertionError):  # the node is gone: no association any more
        node.wait_ready(timeout=1)
