"""A re-made result retires the earlier one in PACS: the real node, a series sent, delivered, then sent again with
one more slice; the second job's rejection note (IOCM KOS, "Rejected for Quality Reasons") reaches a real Orthanc
1.10.1 by each delivery path (C-STORE, STOW-RS, Orthanc REST), conforms (dciodvfy 0 errors) and names every
instance of the earlier derived series that Orthanc holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom

from tests.support.pacs import api, orthanc_dicomweb, phantom, start_node
from tests.support.peers import Orthanc, dciodvfy, storescu, wait_until


def _jobs(node: Any, series: str) -> list[dict[str, Any]]:
    with api(node) as c:
        return [j for j in c.get("/jobs").json()["jobs"] if j["series_uid"] == series]


def _delivered(node: Any, series: str, n: int) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        jobs = [j for j in _jobs(node, series) if j["state"] == "delivered"]
        return jobs if len(jobs) >= n else None

    try:
        jobs: list[dict[str, Any]] = wait_until(done, 180, interval=0.3, what=f"{n} delivered job(s)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\njobs: {_jobs(node, series)}\nnode log:\n{node.log()[-4000:]}") from None
    return jobs


def _held(o: Orthanc, study: str) -> dict[str, list[pydicom.Dataset]]:
    """Orthanc's instances of ``study`` by SeriesInstanceUID (files downloaded over REST)."""
    out: dict[str, list[pydicom.Dataset]] = {}
    with o.client() as c:
        for s in o.series_of_study(study):
            for iid in s["Instances"]:
                raw = c.get(f"/instances/{iid}/file").content
                ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
                out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return out


def test_a_re_made_result_is_retired_by_a_conformant_note_on_every_path(tmp_path: Path) -> None:
    pacs = {p: orthanc_dicomweb(tmp_path / f"orthanc-{p}") for p in ("dicom", "dicomweb", "orthanc")}
    node = None
    try:
        node = start_node(tmp_path / "node", {
            "destinations": [
                {"name": "dicom", "kind": "dicom", "ae_title": pacs["dicom"].aet, "host": "127.0.0.1",
                 "port": pacs["dicom"].dicom_port, "confirm": "count"},
                {"name": "dicomweb", "kind": "dicomweb", "url": f"{pacs['dicomweb'].url}/dicom-web"},
                {"name": "orthanc", "kind": "orthanc", "url": pacs["orthanc"].url}],
            "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                       "destinations": ["dicom", "dicomweb", "orthanc"]}]})
        files = phantom(tmp_path, seed=1919, slices=6)
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        series, study = str(ref.SeriesInstanceUID), str(ref.StudyInstanceUID)
        assert storescu(files[:5], node.port).returncode == 0
        first = _delivered(node, series, 1)[0]
        assert storescu(files[5:], node.port).returncode == 0  # one more slice: the result is re-made
        jobs = _delivered(node, series, 2)
        second = next(j for j in jobs if j["id"] != first["id"])
        assert second["derived_series_uid"] != first["derived_series_uid"]
        for path, o in pacs.items():
            held = _held(o, study)
            earlier = {str(d.SOPInstanceUID) for d in held.get(first["derived_series_uid"], [])}
            notes = [d for dss in held.values() for d in dss if d.Modality == "KO"]
            assert len(earlier) == 9 and len(notes) == 1, f"{path}: {len(earlier)} earlier, {len(notes)} notes"
            note = notes[0]
            named = {str(i.ReferencedSOPInstanceUID) for st in note.CurrentRequestedProcedureEvidenceSequence
                     for s in st.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
            assert earlier <= named, f"{path}: the note leaves out {len(earlier - named)} earlier instance(s)"
            assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
            kos = tmp_path / f"kos-{path}.dcm"
            note.save_as(kos, enforce_file_format=True)
            errors, _ = dciodvfy(kos)
            assert not errors, f"{path}: {errors}"
    finally:
        if node is not None:
            node.stop()
        for o in pacs.values():
            o.stop()
