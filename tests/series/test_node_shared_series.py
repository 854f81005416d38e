"""What the running node does with the awkward real series: tilted GE CT, J2K CT without UIDs, enhanced MR.

Each is sent with dcmtk storescu to the real node process; results land in a folder destination.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.fixtures import shared_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import dciodvfy, storescu


def _series_dirs(out: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID folder -> files, below the folder destination."""
    return {d.name: sorted(d.glob("*.dcm")) for d in out.glob("*/*") if d.is_dir()}


def _ipp(ds) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.array([float(v) for v in ds.ImagePositionPatient])


def test_tilted_ge_ct_gives_one_derived_series_per_regular_run(tmp_path: Path) -> None:
    files = sorted(shared_series("ct_head_ge_tilted_irregular").glob("*.dcm"))
    with NodeProc.start(tmp_path) as node:
        r = storescu(files, node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stderr
        jobs = node.wait_jobs(lambda js: js and all(j["state"] in ("delivered", "failed") for j in js),
                              timeout=240, what="GE job delivered")
        listed = node.status_cli()
        page = httpx.get(f"{node.http_url}/dashboard/jobs/{jobs[0]['id']}", timeout=30)
    assert [j["state"] for j in jobs] == ["delivered"], jobs
    series = _series_dirs(tmp_path / "out")
    derived = {uid: fs for uid, fs in series.items() if dcmread(fs[0]).Modality == "CT"}
    # status --json and the dashboard's job page name both derived series, not only the first (user18)
    assert len(derived) == 2 and sorted(listed[0]["derived_series_uids"]) == sorted(derived), listed[0]
    assert listed[0]["derived_series"] == listed[0]["derived_series_uids"][0]
    assert page.status_code == 200 and all(uid in page.text for uid in derived), page.text[-2000:]
    sc = {uid: fs for uid, fs in series.items() if uid not in derived}
    # two regular runs (14 slices at 4 mm, 14 at 7 mm): (14-1)*2+1 = 27 derived slices each (cubic: no sigma)
    assert sorted(len(fs) for fs in derived.values()) == [27, 27]
    assert sc == {}
    steps = []
    for fs in derived.values():
        dss = sorted((dcmread(f) for f in fs), key=lambda d: int(d.InstanceNumber))
        normal = np.cross(*np.array([float(v) for v in dss[0].ImageOrientationPatient]).reshape(2, 3))
        gaps = np.diff([_ipp(d) @ normal for d in dss])
        assert np.allclose(gaps, gaps[0], atol=1e-3)
        step = abs(float(gaps[0]))
        steps.append(step)
        assert abs(float(dss[0].SpacingBetweenSlices) - step) < 1e-3
        assert "DERIVED" in dss[0].ImageType
        errors, _ = dciodvfy(fs[0])
        assert not errors, errors
    # the 4 mm run (4.0019 mm measured along the tilted normal) becomes half of it, the 7 mm run (6.9986) too
    assert sorted(steps) == pytest.approx([4.0019 / 2, 6.9986 / 2], abs=2e-4), steps


def test_j2k_ct_without_uids_is_refused_per_instance_and_the_node_carries_on(tmp_path: Path) -> None:
    """The J2K CT's dataset has empty SOPClassUID, SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID
    (only the file meta names them). dcmtk storescu will not even send it ("unknown SOP class"); a lenient
    sender that fills SOP class/instance from the file meta still gets 0xC210 (no Study/Series UID) per instance."""
    files = sorted(shared_series("ct_body_j2k_siemens_petct").glob("*.dcm"))
    good = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"))
    with NodeProc.start(tmp_path) as node:
        r = storescu(files[:1], node.port, aet=node.ae_title, extra_args=["-xs"])
        assert r.returncode != 0 and "presentation context" in (r.stdout + r.stderr).lower()
        ae = AE(ae_title="J2KSENDER")
        ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            statuses = []
            for f in files[:3]:
                ds = dcmread(f)  # as a lenient gateway would: SOP class and instance taken from the file meta
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
                statuses.append(int(assoc.send_c_store(ds).Status))
        finally:
            assoc.release()
        assert statuses == [0xC210] * 3
        assert "SeriesInstanceUID is missing or empty" in node.log(), node.log()[-2000:]
        # nothing of it was accepted, and a good series still flows
        r = storescu(good, node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stderr
        jobs = node.wait_jobs(lambda js: js and js[-1]["state"] == "delivered", timeout=180, what="good series")
        assert len(jobs) == 1 and jobs[0]["instances"] == len(good)


def test_enhanced_multiframe_mr_is_upscaled_through_plane(tmp_path: Path) -> None:
    files = sorted(shared_series("mr_t1_enhanced_multiframe_siemens_xa30").glob("*.dcm"))
    with NodeProc.start(tmp_path) as node:
        r = storescu(files, node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stderr
        jobs = node.wait_jobs(lambda js: js and js[-1]["state"] in ("delivered", "failed"), timeout=240,
                              what="enhanced MR job")
    assert jobs[-1]["state"] == "delivered", jobs
    series = _series_dirs(tmp_path / "out")
    n_frames = int(dcmread(files[0], stop_before_pixels=True).NumberOfFrames)
    derived = [fs for fs in series.values() if dcmread(fs[0], stop_before_pixels=True).Modality == "MR"]
    assert [len(fs) for fs in derived] == [(n_frames - 1) * 2 + 1]
    ds = dcmread(derived[0][0])
    # sampled every 1 mm; the slices are still the acquired 2 mm thick (SliceThickness claims no more)
    assert float(ds.SpacingBetweenSlices) == pytest.approx(1.0, abs=1e-3)
    assert float(ds.SliceThickness) == pytest.approx(2.0)
    errors, _ = dciodvfy(derived[0][0])
    assert not errors, errors


def test_node_delivers_one_derived_series_per_volume_of_the_fmri_and_a_mosaic_as_slices(tmp_path: Path) -> None:
    fmri = sorted(shared_series("mr_fmri_philips_3volumes").glob("*.dcm"))
    mosaic = sorted(shared_series("mr_epi_mosaic_siemens_single").glob("*.dcm"))
    with NodeProc.start(tmp_path) as node:
        for files in (fmri, mosaic):
            r = storescu(files, node.port, aet=node.ae_title)
            assert r.returncode == 0, r.stderr
        jobs = node.wait_jobs(lambda js: len(js) == 2 and all(j["state"] in ("delivered", "failed") for j in js),
                              timeout=240, what="fMRI and mosaic jobs")
    assert [j["state"] for j in jobs] == ["delivered", "delivered"], jobs
    series = {uid: [dcmread(f, stop_before_pixels=True) for f in fs] for uid, fs in _series_dirs(tmp_path / "out").items()}
    derived = {dss[0].SeriesDescription: dss for dss in series.values() if dss[0].SOPClassUID == MRImageStorage}
    tail = " SR x2 cubic - not for diagnosis"
    assert sorted(derived) == [f"EPI_asc time 1{tail}", f"EPI_asc time 2{tail}", f"EPI_asc time 3{tail}",
                               f"noPF_noPAT_noPOS_PEres100_ES0p59{tail}"]  # LO 64: source shortened first
    assert [len(derived[f"EPI_asc time {t}{tail}"]) for t in (1, 2, 3)] == [17, 17, 17]
    mos = derived[f"noPF_noPAT_noPOS_PEres100_ES0p59{tail}"]
    assert len(mos) == 119 and {(int(d.Rows), int(d.Columns)) for d in mos} == {(90, 90)}
    numbers = [int(dss[0].SeriesNumber) for dss in series.values()]
    assert len(series) == 4 and len(set(numbers)) == 4  # 4 derived series (cubic: no sigma), numbers distinct
