"""What a series is made of: orientation compared with a tolerance, one copy per instance, Siemens mosaics split into
their slices, and series holding several volumes (time points, echoes, M/P, b-values) split into volumes."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.app.phantom import write_phantom_series
from node.errors import VolumeError
from node.series import load_series, load_volumes
from tests.support.fixtures import shared_series
from tests.support.series import phantom_stack, variant


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_stack(tmp_path_factory.mktemp("phantom"))


def _set_pixels(ds: pydicom.Dataset, arr: np.ndarray) -> None:
    ds.PixelData = np.ascontiguousarray(arr.astype(ds.pixel_array.dtype)).tobytes()


# ---------------------------------------------------------------------------------------------- item 8: orientation


def _rotated(files: list[Path], out: Path, cosines: Callable[[int], tuple[float, float]]) -> list[Path]:
    """The phantom rotated about x: slice k gets column cosine (0, c, s) = cosines(k), positions rotated with it."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        c, s = cosines(k)
        rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        ipp = rot @ np.array([float(v) for v in ds.ImagePositionPatient])
        ds.ImageOrientationPatient = ["1", "0", "0", "0", f"{c:.8f}", f"{s:.8f}"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    return variant(files, out, "rot", change)


def test_orientation_jitter_below_1e6_is_one_orientation(phantom: list[Path], tmp_path: Path) -> None:
    # as case 05: the y-cosine alternates 0.99949960 / 0.99950040, on both sides of a 3-decimal rounding edge
    c0 = 0.9995
    s0 = math.sqrt(1 - c0 * c0)
    files = _rotated(phantom, tmp_path, lambda k: (c0 + (4e-7 if k % 2 else -4e-7), s0))
    vol = load_series(files)
    assert vol.shape == (6, 32, 32) and not vol.irregular
    assert vol.spacing[0] == pytest.approx(3.0, abs=1e-3)


def test_real_orientation_change_is_refused_with_the_real_difference(phantom: list[Path], tmp_path: Path) -> None:
    tilt = math.radians(0.5)
    files = _rotated(phantom, tmp_path, lambda k: (math.cos(tilt), math.sin(tilt)) if k >= 3 else (1.0, 0.0))
    with pytest.raises(VolumeError) as err:
        load_series(files)
    msg = str(err.value)
    assert "differ in matrix, orientation or pixel spacing" in msg
    # the real difference: 1 - cos(0.5 deg) on y, sin(0.5 deg) = 0.00873 on z; 0.5 deg; never a rounded 0.001
    assert f"{math.sin(tilt):.3g} in a direction cosine (0.5 deg" in msg, msg
    assert "3 slice(s) 32x32" in msg and "rot-CT0003.dcm" in msg


# ---------------------------------------------------------------------------------------------- item 9: duplicates


def test_duplicate_instance_is_kept_once_and_named(phantom: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(phantom[0].parent, folder)
    shutil.copyfile(folder / "CT0003.dcm", folder / "CT0003 (1).dcm")
    vol = load_series(_files(folder))
    assert vol.shape[0] == 6  # the copy is the same instance: 6 slices, not a repeated position
    assert "CT0003 (1).dcm is a second copy of CT0003.dcm (same SOPInstanceUID, same pixels): kept once" in vol.notes


def test_conflicting_duplicate_is_refused_naming_both_files(phantom: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(phantom[0].parent, folder)
    ds = pydicom.dcmread(folder / "CT0003.dcm")
    _set_pixels(ds, ds.pixel_array + 7)  # same SOPInstanceUID, other pixels
    ds.save_as(folder / "CT0003-other.dcm", enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"CT0003\.dcm and CT0003-other\.dcm carry the same SOPInstanceUID but "
                                          r"different pixel data"):
        load_series(_files(folder))


@pytest.mark.parametrize(("keyword", "value"), [
    ("ImagePositionPatient", None),  # moved 2.5 mm along the stack
    ("RescaleIntercept", "-1000"),  # same stored pixels, other HU
    ("ImageOrientationPatient", [1, 0, 0, 0, 0.99, 0.1410674]),
])
def test_a_copy_with_the_same_pixels_but_another_place_or_meaning_is_refused(phantom: list[Path], tmp_path: Path,
                                                                            keyword: str, value: object) -> None:
    """Same SOPInstanceUID, same stored pixels, another ImagePositionPatient / rescale / orientation (break13f):
    the first file by name was kept as "a second copy (same pixels)", its geometry or values chosen by file name."""
    folder = tmp_path / "in"
    shutil.copytree(phantom[0].parent, folder)
    ds = pydicom.dcmread(folder / "CT0003.dcm")
    if value is None:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        value = [ipp[0], ipp[1], ipp[2] + 2.5]
    setattr(ds, keyword, value)
    ds.save_as(folder / "CT0003 (1).dcm", enforce_file_format=True)
    with pytest.raises(VolumeError, match=rf"CT0003\.dcm and CT0003 \(1\)\.dcm carry the same SOPInstanceUID but "
                                          rf"different {keyword}"):
        load_series(_files(folder))


# ---------------------------------------------------------------------------------------------- item 10: mosaics


def test_siemens_mosaic_is_split_into_its_60_slices() -> None:
    f = _files(shared_series("mr_epi_mosaic_siemens_single"))[0]
    vol = load_series([f])
    assert vol.shape == (60, 90, 90)  # 60 slices of 90x90 in an 8x8 grid of the 720x720 image
    assert vol.spacing == pytest.approx((2.4, 2.4, 2.4), abs=1e-4)
    assert vol.normal == pytest.approx([0, 0, 1], abs=1e-6)
    # the first tile: the mosaic's IPP moved to the top-left tile ((720 - 90) / 2 pixels of 2.4 mm in x and y)
    ds = pydicom.dcmread(f)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    assert vol.positions[0] == pytest.approx(ipp + [315 * 2.4, 315 * 2.4, 0], abs=1e-3)
    # slices 2.4 mm apart along +z, in tile order; slice k holds tile k of the grid
    assert np.allclose(np.diff(vol.positions[:, 2]), 2.4, atol=1e-4)
    raw = ds.pixel_array
    for k in (0, 1, 37, 59):
        r, c = divmod(k, 8)
        np.testing.assert_array_equal(vol.data[k], raw[r * 90:(r + 1) * 90, c * 90:(c + 1) * 90])
    assert any("mosaic" in n for n in vol.notes)


def test_mosaic_that_cannot_be_split_is_refused_with_the_reason(tmp_path: Path) -> None:
    src = _files(shared_series("mr_epi_mosaic_siemens_single"))[0]
    no_csa = pydicom.dcmread(src)
    del no_csa[no_csa.private_block(0x0029, "SIEMENS CSA HEADER").get_tag(0x10)]
    no_csa.save_as(tmp_path / "no_csa.dcm", enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"no_csa\.dcm: Siemens mosaic .* no Siemens CSA image header .*not "
                                          r"super-resolved as one picture"):
        load_series([tmp_path / "no_csa.dcm"])
    wrong = pydicom.dcmread(src)
    wrong.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value = 59
    wrong.save_as(tmp_path / "wrong.dcm", enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"\(0019,100A\) says 59 images, the CSA header 60"):
        load_series([tmp_path / "wrong.dcm"])


# ---------------------------------------------------------------------------------------------- item 11: volumes


def test_fmri_three_time_points_are_three_volumes() -> None:
    files = _files(shared_series("mr_fmri_philips_3volumes"))
    vols = load_volumes(files)
    assert [v.shape[0] for v in vols] == [9, 9, 9]
    assert [v.volume_label for v in vols] == ["time 1", "time 2", "time 3"]
    assert [v.volume for v in vols] == [(1, 3), (2, 3), (3, 3)]
    for v in vols:  # each volume a regular stack at the same 9 positions, from its own 9 files
        assert not v.irregular and v.spacing[0] == pytest.approx(8.0, abs=1e-3)
        np.testing.assert_allclose(v.positions, vols[0].positions, atol=1e-6)
        assert {int(d.TemporalPositionIdentifier) for d in v.datasets} == {v.volume[0]}
    with pytest.raises(VolumeError, match=r"holds 3 volumes \(time 1, time 2, time 3\)"):
        load_series(files)


def test_enhanced_field_map_two_echoes_are_two_volumes() -> None:
    files = _files(shared_series("mr_fieldmap_enhanced_2echo_siemens_xa30"))
    vols = load_volumes(files)
    assert [v.shape for v in vols] == [(33, 64, 64), (33, 64, 64)]
    assert [v.volume_label for v in vols] == ["echo 1 TE 10", "echo 2 TE 12.46"]
    assert {d.SOPInstanceUID for d in vols[0].datasets} != {d.SOPInstanceUID for d in vols[1].datasets}
    np.testing.assert_allclose(vols[0].positions, vols[1].positions, atol=1e-6)
    assert not np.array_equal(vols[0].data, vols[1].data)


def test_magnitude_and_phase_are_two_volumes(phantom: list[Path], tmp_path: Path) -> None:
    def mag(ds: pydicom.Dataset, k: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]

    def phase(ds: pydicom.Dataset, k: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]
        _set_pixels(ds, ds.pixel_array // 2)

    files = variant(phantom, tmp_path, "m", mag) + variant(phantom, tmp_path, "p", phase)
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("type M", 6), ("type P", 6)]
    assert all(str(d.ImageType[2]) == "P" for d in vols[1].datasets)


def test_echoes_with_jittered_echo_times_are_two_volumes(phantom: list[Path], tmp_path: Path) -> None:
    def echo(n: int, te: float) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.EchoNumbers = n
            ds.EchoTime = f"{te + (4e-4 if k % 2 else 0):.4f}"  # TE written 10.0000 / 10.0004: one echo
        return change

    files = variant(phantom, tmp_path, "e1", echo(1, 10.0)) + variant(phantom, tmp_path, "e2", echo(2, 20.0))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("echo 1", 6), ("echo 2", 6)]


def test_diffusion_b_values_and_directions_are_volumes(phantom: list[Path], tmp_path: Path) -> None:
    def dwi(b: float, g: tuple[float, float, float]) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.DiffusionBValue = b
            ds.DiffusionGradientOrientation = list(g)
        return change

    files = (variant(phantom, tmp_path, "b0", dwi(0, (0, 0, 0)))
             + variant(phantom, tmp_path, "bx", dwi(1000, (1, 0, 0)))
             + variant(phantom, tmp_path, "by", dwi(1000, (0, 1, 0))))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("b=0", 6), ("b=1000 dir 1", 6), ("b=1000 dir 2", 6)]


def test_a_per_slice_acquisition_number_does_not_fragment_the_volumes(phantom: list[Path], tmp_path: Path) -> None:
    def time(t: int) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.TemporalPositionIdentifier = t
            ds.AcquisitionNumber = 100 * t + k  # changes with every slice
        return change

    files = variant(phantom, tmp_path, "t1", time(1)) + variant(phantom, tmp_path, "t2", time(2))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("time 1", 6), ("time 2", 6)]


def test_repeats_nothing_tells_apart_are_refused_naming_the_files(phantom: list[Path], tmp_path: Path) -> None:
    def other(ds: pydicom.Dataset, k: int) -> None:
        _set_pixels(ds, ds.pixel_array // 3)

    files = list(phantom) + variant(phantom[:2], tmp_path, "again", other)
    with pytest.raises(VolumeError) as err:
        load_volumes(files)
    msg = str(err.value)
    assert "4 of its 8 images share a slice position with another" in msg
    assert "files CT0001.dcm, again-CT0001.dcm, CT0002.dcm, again-CT0002.dcm)" in msg
    assert "repeats that no dimension tells apart" in msg and "not super-resolved" in msg


# ---------------------------------------------------------------------------------------------- break12: 4D, no repeats


def _shifted(mm: float) -> Callable[[pydicom.Dataset, int], None]:
    """Moves an image ``mm`` along the slice normal (the phantom is axial: +z)."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        p = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [p[0], p[1], p[2] + mm]
    return change


@pytest.mark.parametrize("what", ["echo", "time", "b-value"])
def test_interleaved_volumes_at_offset_positions_are_not_stacked_into_one(phantom: list[Path], tmp_path: Path,
                                                                          what: str) -> None:
    """Two echoes (time points, b-values) whose slice positions are offset by half a step repeat no position, but
    they are two volumes: stacked, the derived series would alternate contrast slice by slice (a derived image that
    misleads). Found by break12: both were stacked into one volume at half the step."""
    def tag(n: int, shift: float) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            _shifted(shift)(ds, k)
            if what == "echo":
                ds.EchoNumbers, ds.EchoTime = n, f"{10.0 * n:.1f}"
            elif what == "time":
                ds.TemporalPositionIdentifier = n
            else:
                ds.DiffusionBValue = 1000.0 * (n - 1)
                ds.DiffusionGradientOrientation = [0.0, 0.0, 0.0] if n == 1 else [1.0, 0.0, 0.0]
        return change

    files = variant(phantom, tmp_path, "v1", tag(1, 0.0)) + variant(phantom, tmp_path, "v2", tag(2, 1.5))
    try:
        vols = load_volumes(files)
    except VolumeError:
        return  # refusing is also safe
    assert len(vols) == 2, [(v.volume_label, v.shape) for v in vols]
    assert [v.shape[0] for v in vols] == [6, 6]


@pytest.mark.parametrize("numbering", ["interleaved", "blocks", "per slice"])
def test_two_acquisitions_at_offset_positions_are_two_volumes(phantom: list[Path], tmp_path: Path,
                                                              numbering: str) -> None:
    """Two CT phases of one place under one SeriesInstanceUID, told apart only by AcquisitionNumber, positions
    offset by half a step (break12's open finding): stacked, the derived series alternates phase slice by slice.
    AcquisitionNumber that changes per slice or per contiguous block (step-and-shoot, table positions) is one stack."""
    if numbering == "interleaved":
        def first(ds: pydicom.Dataset, k: int) -> None:
            ds.AcquisitionNumber = 1

        def second(ds: pydicom.Dataset, k: int) -> None:
            _shifted(1.5)(ds, k)
            ds.AcquisitionNumber = 2
            ds.RescaleIntercept = float(ds.RescaleIntercept) + 300.0  # the contrast phase
        files = variant(phantom, tmp_path, "a1", first) + variant(phantom, tmp_path, "a2", second)
        vols = load_volumes(files)
        assert [v.shape[0] for v in vols] == [6, 6], [(v.volume_label, v.shape) for v in vols]
        assert all("acquisition" in v.volume_label for v in vols), [v.volume_label for v in vols]
        return

    def number(ds: pydicom.Dataset, k: int) -> None:
        ds.AcquisitionNumber = k + 1 if numbering == "per slice" else 1 + k // 3
    vols = load_volumes(variant(phantom, tmp_path, "n", number))
    assert [v.shape[0] for v in vols] == [6]


@pytest.mark.parametrize("moved", [[3], [3, 4, 5]])
def test_slices_moved_in_plane_off_the_stack_line_are_refused_naming_a_file(phantom: list[Path], tmp_path: Path,
                                                                           moved: list[int]) -> None:
    """break12: one slice (or the upper half of the stack: a second in-plane centre) moved 10 mm along the rows was
    stacked as if aligned: the derived slices between blended anatomy 10 mm apart, their positions interpolated
    between the two centres. A constant shear (gantry tilt) is a different thing and still loads."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        if k in moved:
            p = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [p[0] + 10.0, p[1], p[2]]

    files = variant(phantom, tmp_path / "moved", "mv", change)
    with pytest.raises(VolumeError) as e:
        load_volumes(files)
    assert "mv-" in str(e.value) and "line" in str(e.value), str(e.value)

    def shear(ds: pydicom.Dataset, k: int) -> None:
        p = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [p[0], p[1] + 1.0 * k, p[2]]  # 1 mm per 3 mm step: an 18.4 deg tilt

    vols = load_volumes(variant(phantom, tmp_path / "shear", "sh", shear))
    assert len(vols) == 1 and vols[0].shape[0] == 6 and vols[0].tilt_deg > 10


def test_a_slice_moved_off_the_line_inside_a_run_of_an_irregular_stack_is_refused(tmp_path: Path) -> None:
    """break12: with a slice missing (irregular steps: the stack is cut into runs), a slice moved 10 mm sideways
    inside the longer run was super-resolved with it (exit 0), blending anatomy from two places."""
    from node.series import regular_runs

    files = write_phantom_series(tmp_path / "p", slices=9, size=32, step_mm=3.0, fov_mm=96.0)
    files[1].unlink()  # the first slice is left alone, named; slices 3..9 are one run
    ds = pydicom.dcmread(files[5])
    p = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [p[0] + 10.0, p[1], p[2]]
    ds.save_as(files[5], enforce_file_format=True)
    vol = load_series([f for f in files if f.exists()])
    with pytest.raises(VolumeError) as e:
        regular_runs(vol)
    assert files[5].name in str(e.value) and "line" in str(e.value), str(e.value)


def test_two_slice_thicknesses_in_one_regular_stack_are_refused(phantom: list[Path], tmp_path: Path) -> None:
    """break12: a 5 mm and a 2 mm reconstruction under one SeriesInstanceUID, positions interleaved, made one regular
    stack at half the step: it was super-resolved as one volume, every derived slice labelled with the first
    slice's thickness, the engine's slice profile that of half the slices."""
    def thick(t: str, shift: float) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            _shifted(shift)(ds, k)
            ds.SliceThickness = t
        return change

    files = variant(phantom, tmp_path, "t5", thick("5", 0.0)) + variant(phantom, tmp_path, "t2", thick("2.0", 1.5))
    with pytest.raises(VolumeError) as e:
        load_volumes(files)
    assert "SliceThickness" in str(e.value) and "t5-" in str(e.value) and "t2-" in str(e.value), str(e.value)


def test_odd_and_even_slices_in_two_acquisitions_of_one_contiguous_stack_are_one_volume(tmp_path: Path) -> None:
    """rev12: a 2D multi-slice MR acquired in two passes (GE 'interleaved' acquisitions, zero gap: odd slices in
    acquisition 1, even slices in acquisition 2; dcm2niix stacks across GE acquisition numbers for this reason) is
    one contiguous stack: its slice thickness equals the step of the stack as a whole. It was split into two
    volumes at twice the step, each with a gap of one slice thickness (half the sampling, two derived series)."""
    files = write_phantom_series(tmp_path / "p", slices=12, size=32, step_mm=3.0, fov_mm=96.0)

    def passes(ds: pydicom.Dataset, k: int) -> None:
        ds.AcquisitionNumber = 1 + k % 2
        ds.SliceThickness = "3"
        ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    vols = load_volumes(variant(files, tmp_path / "v", "ps", passes))
    assert [v.shape[0] for v in vols] == [12], [(v.volume_label, v.shape) for v in vols]


@pytest.mark.parametrize("what", ["time", "echo"])
def test_a_value_per_slice_is_no_set_of_volumes(phantom: list[Path], tmp_path: Path, what: str) -> None:
    """rev12: TemporalPositionIdentifier (or EchoNumbers) that counts the images one by one, each at its own
    position, names no interleaved volumes: the series was split into 6 'volumes' of one image each (none can be
    super-resolved), where before it was one stack."""
    def per_slice(ds: pydicom.Dataset, k: int) -> None:
        if what == "time":
            ds.TemporalPositionIdentifier = k + 1
        else:
            ds.EchoNumbers, ds.EchoTime = k + 1, "10"
    vols = load_volumes(variant(phantom, tmp_path, "ps", per_slice))
    assert [v.shape[0] for v in vols] == [6], [(v.volume_label, v.shape) for v in vols]


def test_two_slice_thicknesses_in_a_run_of_an_irregular_stack_are_refused(phantom: list[Path],
                                                                          tmp_path: Path) -> None:
    """rev12: the refusal of two SliceThickness values interleaved in one regular stack (break12) is bypassed when
    one slice is missing: the stack is irregular, cut into runs, and the longer run (both reconstructions
    interleaved) was super-resolved as one volume."""
    from node.series import regular_runs

    def thick(t: str, shift: float) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            _shifted(shift)(ds, k)
            ds.SliceThickness = t
        return change

    t5 = variant(phantom, tmp_path, "t5", thick("5", 0.0))
    files = t5[:2] + t5[3:] + variant(phantom, tmp_path, "t2", thick("2.0", 1.5))
    vol = load_series(files)
    assert vol.irregular
    with pytest.raises(VolumeError) as e:
        regular_runs(vol)
    assert "SliceThickness" in str(e.value) and "t5-" in str(e.value) and "t2-" in str(e.value), str(e.value)


def test_two_rescale_types_in_one_volume_are_refused(phantom: list[Path], tmp_path: Path) -> None:
    """break12's open finding: half the slices in HU, half in US (unspecified units) were stacked into one volume
    without a word. Absent RescaleType beside a stated one is not a conflict (CT is HU by definition)."""
    def units(ds: pydicom.Dataset, k: int) -> None:
        ds.RescaleType = "HU" if k < 3 else "US"
    with pytest.raises(VolumeError) as e:
        load_volumes(variant(phantom, tmp_path / "mixed", "ru", units))
    assert "RescaleType" in str(e.value) and "HU x3" in str(e.value) and "US x3" in str(e.value), str(e.value)

    def some(ds: pydicom.Dataset, k: int) -> None:
        if k < 3:
            ds.RescaleType = "HU"
        elif "RescaleType" in ds:
            del ds.RescaleType
    assert [v.shape[0] for v in load_volumes(variant(phantom, tmp_path / "some", "rs", some))] == [6]


# ---------------------------------------------------------------------------------------------- fix13: values absent


def _mr(ds: pydicom.Dataset) -> None:
    ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID


def _tagged(what: str, n: int, missing: tuple[int, ...], shift: float = 0.0,
            per_slice: bool = False) -> Callable[[pydicom.Dataset, int], None]:
    """Volume ``n`` of an MR series: ``what`` ("echo": EchoNumbers n with EchoTime 10 n; "echo+te": the same, both
    absent on ``missing``; "time": TemporalPositionIdentifier n, or k + 1 ``per_slice``) on every slice k except
    ``missing``; positions moved ``shift`` mm along the normal."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        _mr(ds)
        _shifted(shift)(ds, k)
        gone = k in missing
        if what.startswith("echo"):
            if not gone:
                ds.EchoNumbers = n
            if not (gone and what == "echo+te"):
                ds.EchoTime = f"{10.0 * n:.1f}"
        elif not gone:
            ds.TemporalPositionIdentifier = k + 1 if per_slice else n
    return change


@pytest.mark.parametrize("what", ["echo", "echo+te", "time", "time per slice"])
def test_a_value_absent_on_some_slices_of_one_volume_does_not_split_it(phantom: list[Path], tmp_path: Path,
                                                                     what: str) -> None:
    """fix13: EchoNumbers absent on 2 of the 6 slices of a single-echo stack (EchoTime on all) split it into 'echo 1'
    (4 slices) and 'echo 2 TE 10' (2 slices); a TemporalPositionIdentifier counting the slices but absent on 2 made
    4 one-slice volumes and a 'time ?' volume of 2. An absent value that fits only one value the series states is
    that value: one stack of 6."""
    files = variant(phantom, tmp_path, "v", _tagged(what.split()[0], 1, (1, 4), per_slice="per slice" in what))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("", 6)]


def test_two_echoes_with_echo_numbers_absent_on_some_slices_are_told_apart_by_echo_time(phantom: list[Path],
                                                                                       tmp_path: Path) -> None:
    """fix13: a 2-echo series (each echo at the same 6 positions) with EchoNumbers absent on 3 slices became 4
    volumes (echo 1 x4, echo 2 x5, 'echo 3 TE 10' x2, 'echo 4 TE 20' x1). EchoTime still says which echo they are."""
    files = (variant(phantom, tmp_path, "e1", _tagged("echo", 1, (1, 4)))
             + variant(phantom, tmp_path, "e2", _tagged("echo", 2, (2,))))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("echo 1", 6), ("echo 2", 6)]
    assert {float(d.EchoTime) for d in vols[0].datasets} == {10.0}
    assert {float(d.EchoTime) for d in vols[1].datasets} == {20.0}


@pytest.mark.parametrize(("what", "attribute", "shift"), [("echo+te", "EchoNumbers", 0.0),
                                                         ("time", "TemporalPositionIdentifier", 0.0),
                                                         ("echo+te", "EchoNumbers", 1.5),
                                                         ("time", "TemporalPositionIdentifier", 1.5)])
def test_two_volumes_with_the_value_absent_on_some_slices_are_refused_naming_it(phantom: list[Path], tmp_path: Path,
                                                                               what: str, attribute: str,
                                                                               shift: float) -> None:
    """fix13: two echoes (time points) at the same positions, or interleaved (offset by half a step), with the value
    absent on some slices made 'echo ?' / 'time ?' volumes of 2-3 slices beside echo 1 and echo 2 with slices
    missing. Which volume those slices belong to cannot be told: refused, naming the attribute and the files."""
    files = (variant(phantom, tmp_path, "a1", _tagged(what, 1, (1,)))
             + variant(phantom, tmp_path, "a2", _tagged(what, 2, (3,), shift=shift)))
    with pytest.raises(VolumeError) as e:
        load_volumes(files)
    msg = str(e.value)
    assert attribute in msg and "a1-CT0002.dcm" in msg and "a2-CT0004.dcm" in msg, msg
    assert "2 of its 12 images" in msg, msg


def test_interleaved_acquisitions_with_acquisition_number_absent_on_some_slices_are_refused(
        phantom: list[Path], tmp_path: Path) -> None:
    """fix13: two CT phases interleaved (offset by half a step), AcquisitionNumber absent on one slice of each, were
    stacked into one volume of 12 slices alternating phase (an absent number turned the interleaved split off).
    One acquisition with the number absent on some slices is still one stack."""
    def acquisition(n: int, missing: int, shift: float) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            _shifted(shift)(ds, k)
            if k == missing:
                if "AcquisitionNumber" in ds:
                    del ds.AcquisitionNumber
            else:
                ds.AcquisitionNumber = n
        return change

    files = (variant(phantom, tmp_path / "two", "q1", acquisition(1, 1, 0.0))
             + variant(phantom, tmp_path / "two", "q2", acquisition(2, 3, 1.5)))
    with pytest.raises(VolumeError) as e:
        load_volumes(files)
    assert "AcquisitionNumber" in str(e.value) and "q1-CT0002.dcm" in str(e.value), str(e.value)
    one = variant(phantom, tmp_path / "one", "o", acquisition(1, 2, 0.0))
    assert [v.shape[0] for v in load_volumes(one)] == [6]
