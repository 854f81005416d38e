"""Series → volume on every shared real series, the generated phantom, and the series that cannot be volumes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.app.phantom import write_phantom_series
from node.errors import VolumeError
from node.series import check_through_plane, load_series, regular_runs
from tests.support.fixtures import shared_series


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("phantom")
    write_phantom_series(d, slices=12, size=96, step_mm=2.5, fov_mm=200.0)
    return d


def test_generated_phantom_geometry_and_hu(phantom_dir: Path) -> None:
    vol = load_series(_files(phantom_dir))
    assert vol.shape == (12, 96, 96)
    assert vol.spacing[0] == pytest.approx(2.5)
    assert vol.spacing[1] == pytest.approx(200.0 / 96, rel=1e-5)
    assert np.allclose(np.diff(vol.positions[:, 2]), 2.5)
    assert vol.modality == "CT" and vol.value_range == (-1024.0, 3071.0)
    mid = vol.data[6]
    assert mid[0, 0] == pytest.approx(-1000, abs=1)  # air
    assert float(np.median(mid[44:52, 24:30])) == pytest.approx(35, abs=8)  # brain, 40 mm left of the centre
    assert mid.max() > 900  # skull
    vin = vol.to_engine_input()
    assert vin.data.dtype == np.float32 and vin.spacing == vol.spacing and vin.value_range == vol.value_range


def test_philips_phantom_thin_and_thick_share_frame_of_reference() -> None:
    thin = load_series(_files(shared_series("ct_head_phantom_philips_1mm")))
    thick = load_series(_files(shared_series("ct_head_phantom_philips_5mm")))
    assert thin.shape == (140, 512, 512) and thick.shape == (28, 512, 512)
    assert thin.spacing[0] == pytest.approx(1.0, abs=1e-3) and thick.spacing[0] == pytest.approx(5.0, abs=1e-3)
    assert thin.spacing[1] == pytest.approx(0.4512, abs=1e-4)
    assert not thin.irregular and not thick.irregular
    assert thin.datasets[0].FrameOfReferenceUID == thick.datasets[0].FrameOfReferenceUID
    # slices sorted along the normal: IPP . normal strictly increasing
    assert np.all(np.diff(thin.positions @ thin.normal) > 0)
    # HU through intercept -1024: air is about -1000, nothing below the representable minimum
    assert thin.data.min() >= -1024 and thick.value_range == (-1024.0, 3071.0)
    # the thick series lies inside the thin one's extent
    z_thin, z_thick = thin.positions @ thin.normal, thick.positions @ thick.normal
    assert z_thin.min() - 3 <= z_thick.min() and z_thick.max() <= z_thin.max() + 3


def test_ge_tilted_irregular_is_measured_and_split_into_regular_runs() -> None:
    vol = load_series(_files(shared_series("ct_head_ge_tilted_irregular")))
    assert vol.shape == (28, 512, 512)
    assert vol.tilt_deg == pytest.approx(18.5, abs=0.2)
    assert vol.irregular
    assert "4.00 mm x13, 1.08 mm, 7.00 mm x13" in " ".join(vol.notes)
    # PixelPaddingValue -1500 is not tissue: replaced by air, nothing below -1024 HU remains
    assert vol.data.min() >= -1024
    with pytest.raises(VolumeError, match="irregular"):
        check_through_plane(vol, 2)
    runs = regular_runs(vol)
    assert [r.shape[0] for r in runs] == [14, 14]
    assert runs[0].spacing[0] == pytest.approx(4.0, abs=0.01) and runs[1].spacing[0] == pytest.approx(7.0, abs=0.01)
    assert runs[0].slice_thickness == pytest.approx(4.0) and runs[1].slice_thickness == pytest.approx(7.0)
    assert [r.run for r in runs] == [(1, 2), (2, 2)]
    for r in runs:
        check_through_plane(r, 2)  # each run is a regular grid


def test_j2k_ct_with_empty_sop_class_decodes() -> None:
    vol = load_series(_files(shared_series("ct_body_j2k_siemens_petct")))
    assert vol.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # taken from the file meta
    assert vol.shape == (20, 512, 512)
    assert vol.spacing[0] == pytest.approx(2.0, abs=1e-3) and vol.slice_thickness == pytest.approx(3.0)
    assert vol.value_range == (-1024.0, 3071.0)
    assert vol.data.min() >= -1024 and vol.data.max() > 200  # bone/contrast present


def test_mprage_oblique_sagittal() -> None:
    vol = load_series(_files(shared_series("mr_t1_mprage_sag_siemens")))
    assert vol.shape == (192, 256, 256)
    assert vol.spacing[0] == pytest.approx(0.9, abs=1e-3) and vol.spacing[1] == pytest.approx(0.859375)
    assert abs(vol.normal[0]) > 0.95 and abs(vol.normal[0]) < 0.9999  # sagittal, oblique
    assert np.linalg.norm(vol.normal) == pytest.approx(1.0)
    assert not vol.irregular and vol.modality == "MR"


def test_enhanced_multiframe_mr_geometry_from_functional_groups() -> None:
    vol = load_series(_files(shared_series("mr_t1_enhanced_multiframe_siemens_xa30")))
    assert vol.shape == (96, 128, 128)
    assert vol.spacing == pytest.approx((2.0, 2.0, 2.0), abs=1e-3)
    assert vol.multiframe and sorted(vol.frame_numbers) == list(range(1, 97))
    ds = vol.datasets[0]
    frames = ds.PerFrameFunctionalGroupsSequence
    want = [float(v) for v in frames[vol.frame_numbers[0] - 1].PlanePositionSequence[0].ImagePositionPatient]
    assert vol.positions[0] == pytest.approx(want)
    assert np.allclose(np.diff(vol.positions @ vol.normal), 2.0, atol=1e-3)
    assert vol.data.dtype == np.float32 and vol.data.max() > 100


def test_nine_transfer_syntaxes_decode_identically_and_are_not_a_stack() -> None:
    files = _files(shared_series("ts_parity_mr_mosaic_9syntaxes"))
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert len(files) == 9 and len(syntaxes) >= 7
    vols = [load_series([f]) for f in files]  # each a Siemens mosaic: 35 slices of 64x64 in a 6x6 grid
    assert vols[0].shape == (35, 64, 64)
    for v in vols[1:]:
        np.testing.assert_array_equal(v.data, vols[0].data)
        np.testing.assert_array_equal(v.positions, vols[0].positions)
    # nine copies of one image at the same positions, nothing telling them apart: refused, the files named
    with pytest.raises(VolumeError, match=r"share a slice position.*1\.dcm, 2\.dcm.*copies of one image"):
        load_series(files)


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_refusals_say_why(phantom_dir: Path, tmp_path: Path) -> None:
    files = _files(phantom_dir)
    # localizer mixed in: same series, another orientation, ImageType LOCALIZER
    loc = pydicom.dcmread(files[0])
    loc.SOPInstanceUID = pydicom.uid.generate_uid()
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    # (field18: one localizer, or one stray plane, beside a stack is set aside, tests/series/test_set_aside.py;
    # a series of localizers only, or two images of another matrix, are refused)
    loc_vol = load_series([*files[:4], _write(loc, tmp_path / "loc.dcm")])
    assert loc_vol.shape[0] == 4 and [w for w, _, _ in loc_vol.set_aside] == ["loc.dcm"]
    with pytest.raises(VolumeError, match="localizer"):
        load_series([_write(loc, tmp_path / "loc.dcm")])
    # varying matrix
    small = pydicom.dcmread(files[1])
    small.SOPInstanceUID = pydicom.uid.generate_uid()
    small.Rows = small.Columns = 48
    small.PixelData = np.zeros((48, 48), np.uint16).tobytes()
    small2 = pydicom.dcmread(files[2])
    small2.SOPInstanceUID = pydicom.uid.generate_uid()
    small2.Rows = small2.Columns = 48
    small2.PixelData = np.zeros((48, 48), np.uint16).tobytes()
    with pytest.raises(VolumeError, match="differ in matrix"):
        load_series([*files[:4], _write(small, tmp_path / "small.dcm"), _write(small2, tmp_path / "small2.dcm")])
    # too few slices for through-plane: one (two are a regular run the cubic spline interpolates)
    check_through_plane(load_series(files[:2]), 2)
    with pytest.raises(VolumeError, match="at least 2"):
        check_through_plane(load_series(files[:1]), 2)
    # non-image SOP class
    sr = copy.deepcopy(pydicom.dcmread(files[0]))
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    del sr.PixelData
    with pytest.raises(VolumeError, match="not an image"):
        load_series([_write(sr, tmp_path / "sr.dcm")])
    # two series
    other = pydicom.dcmread(files[2])
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    other.SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(VolumeError, match="different series"):
        load_series([*files[:2], _write(other, tmp_path / "other.dcm")])
    # not DICOM at all
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom" * 10)
    with pytest.raises(VolumeError, match="junk.dcm"):
        load_series([junk])
