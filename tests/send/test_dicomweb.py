"""DICOMweb: STOW-RS into the node (token-protected, per-instance response), STOW-RS out to Orthanc's DICOMweb."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from node.config import DicomwebDestination
from node.send import make_sender
from tests.support.pacs import TOKEN, api, orthanc_dicomweb, phantom, start_node, wait_job
from tests.support.peers import Orthanc


@pytest.fixture(scope="module")
def web_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    o = orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-web"))
    yield o
    o.stop()


def test_stow_in_is_processed_and_stow_out_lands_in_orthanc(tmp_path: Path, web_orthanc: Orthanc) -> None:
    node = start_node(tmp_path / "node", {
        "destinations": [{"name": "web", "kind": "dicomweb", "url": f"{web_orthanc.url}/dicom-web",
                          "batch_size": 4}],
        "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                   "destinations": ["web"]}]})
    try:
        files = phantom(tmp_path, seed=51, slices=6)
        datasets = [pydicom.dcmread(f) for f in files]
        ref = datasets[0]

        # no token, wrong token: 401 and nothing spooled
        anon = DICOMwebClient(f"{node.http_url}/dicom-web")
        with pytest.raises(Exception) as info:
            anon.store_instances(datasets[:1])
        assert getattr(getattr(info.value, "response", None), "status_code", None) == 401
        with api(node, token="wrong") as c:
            assert c.post("/dicom-web/studies", content=b"--x--",
                          headers={"Content-Type": "multipart/related; boundary=x"}).status_code == 401

        client = DICOMwebClient(f"{node.http_url}/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})
        response = client.store_instances(datasets, study_instance_uid=ref.StudyInstanceUID)
        assert sorted(i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence) == \
            sorted(d.SOPInstanceUID for d in datasets)
        assert "FailedSOPSequence" not in response

        # WADO-RS of the spooled series (what remote Celery workers read): the same instances come back
        back = client.retrieve_series(ref.StudyInstanceUID, ref.SeriesInstanceUID)
        assert sorted(d.SOPInstanceUID for d in back) == sorted(d.SOPInstanceUID for d in datasets)
        assert back[0].pixel_array.tobytes() in {d.pixel_array.tobytes() for d in datasets}

        job = wait_job(node, ref.SeriesInstanceUID)
        assert job["state"] == "delivered", job
        # the results are in Orthanc, seen through its own DICOMweb (QIDO-RS)
        qido = DICOMwebClient(f"{web_orthanc.url}/dicom-web")
        found = {s["0020000E"]["Value"][0]: s for s in qido.search_for_series(ref.StudyInstanceUID)}
        assert set(found) == {job["derived_series_uid"]} and job["uncertainty_series_uid"] == ""  # cubic: no sigma
        for uid in found:
            assert len(qido.search_for_instances(ref.StudyInstanceUID, uid)) == 11
    finally:
        node.stop()


def test_stow_reports_each_refused_instance(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", {})
    try:
        good = phantom(tmp_path, seed=52, slices=3)[0].read_bytes()
        other_study = phantom(tmp_path, seed=53, slices=3)[0]
        url_study = pydicom.dcmread(phantom(tmp_path, seed=52, slices=3)[0]).StudyInstanceUID
        body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + good + b"\r\n"
                b"--b1\r\nContent-Type: application/dicom\r\n\r\nnot a dicom file\r\n"
                b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + other_study.read_bytes() + b"\r\n--b1--\r\n")
        with api(node) as c:
            r = c.post(f"/dicom-web/studies/{url_study}", content=body,
                       headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
            assert r.status_code == 202  # some stored, some refused
            doc = r.json()
            assert len(doc["00081199"]["Value"]) == 1
            reasons = [item["00081197"]["Value"][0] for item in doc["00081198"]["Value"]]
            assert reasons == [0xC210, 0xA900]  # cannot understand; not in the study of the URL
            bad = c.post("/dicom-web/studies", content=b"{}", headers={"Content-Type": "application/json"})
            assert bad.status_code == 415
    finally:
        node.stop()


def test_stow_out_batches_into_orthanc(tmp_path: Path, web_orthanc: Orthanc) -> None:
    files = phantom(tmp_path, seed=54, slices=7)
    sender = make_sender(DicomwebDestination(name="web", url=f"{web_orthanc.url}/dicom-web",
                                           batch_size=3))
    sender.check()
    sender.send(files)
    sender.send(files[:2])  # a resend is harmless
    ref = pydicom.dcmread(files[0], stop_before_pixels=True)
    series = web_orthanc.series_of_study(ref.StudyInstanceUID)
    assert [len(s["Instances"]) for s in series] == [7]
    with httpx.Client(base_url=web_orthanc.url) as c:
        assert c.get(f"/dicom-web/studies/{ref.StudyInstanceUID}/series").status_code == 200
