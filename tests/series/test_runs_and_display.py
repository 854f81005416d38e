"""Per-slice pixel formats, regular runs that leave no slice out without a word, and the series' own window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.app.phantom import phantom_hu, write_phantom_series
from node.errors import VolumeError
from node.series import load_series, series_photometric, series_window, split_runs
from tests.support.fixtures import shared_case, shared_series


def restore(path: Path, hu: np.ndarray, slope: float, intercept: float, bits: int, signed: bool) -> None:
    """Rewrite one CT file's pixels as ``hu`` with its own rescale and stored bit depth."""
    ds = pydicom.dcmread(path)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    assert stored.min() >= lo and stored.max() <= hi
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:g}"
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    ds.save_as(path, enforce_file_format=True)


def test_each_slice_converted_with_its_own_rescale_and_bits(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path, slices=4, size=32, step_mm=5.0, fov_mm=200.0)
    hu = phantom_hu(4, 32, 5.0, 200.0)
    hu[2, 10:14, 10:14] = 5000.0  # dense metal: needs more than 12 bits at intercept -1024
    formats = [(1.0, -1024.0, 12, False), (0.5, -1024.0, 14, False), (1.0, -1024.0, 16, False), (2.0, 0.0, 12, True)]
    for k, (s, b, bits, signed) in enumerate(formats):
        restore(files[k], np.rint(hu[k] / s) * s if s != 1 else np.rint(hu[k]), s, b, bits, signed)
    vol = load_series(files)
    want = np.stack([np.rint(hu[k] / s) * s if s != 1 else np.rint(hu[k]) for k, (s, *_) in enumerate(formats)])
    assert np.max(np.abs(vol.data - want)) == 0.0  # every slice exact in HU
    assert [(f.slope, f.intercept, f.bits_stored, f.signed) for f in vol.formats] == formats
    assert vol.value_range == (-2048 * 2.0, 65535 - 1024.0)  # the union of what every slice can hold
    assert any("vary between slices" in n for n in vol.notes)


def _phantom_missing(tmp_path: Path, keep: list[int], step: float = 2.5) -> list[Path]:
    files = write_phantom_series(tmp_path / "all", slices=max(keep) + 1, size=32, step_mm=step, fov_mm=200.0)
    return [files[k] for k in keep]


def test_two_slices_before_a_gap_are_a_run(tmp_path: Path) -> None:
    # case 06 in general: slice 3 missing -> steps 2.5, 5, 2.5 x7: runs of 2 and 8 slices, nothing left out
    files = _phantom_missing(tmp_path, [0, 1, *range(3, 11)])
    vol = load_series(files)
    split = split_runs(vol)
    assert [r.run_slices for r in split.runs] == [(1, 2, 10), (3, 10, 10)]
    assert [r.run for r in split.runs] == [(1, 2), (2, 2)]
    assert split.left_out == []
    assert sum(r.shape[0] for r in split.runs) == vol.shape[0]
    assert [r.spacing[0] for r in split.runs] == pytest.approx([2.5, 2.5])


def test_a_slice_in_no_run_is_named_with_file_and_reason(tmp_path: Path) -> None:
    # steps 2.5, 5, 5, 5, 5: the first slice shares its step with nobody: named, not dropped silently
    files = _phantom_missing(tmp_path, [0, 1, 3, 5, 7, 9])
    split = split_runs(load_series(files))
    assert [r.run_slices for r in split.runs] == [(2, 6, 6)]
    assert len(split.left_out) == 1
    x = split.left_out[0]
    assert (x.index, x.of, x.file) == (1, 6, files[0].name)
    assert x.sop_instance_uid == pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    assert "2.50 mm to slice 2" in x.reason and "isolated" in x.reason


def test_missing_slice_case_every_input_slice_in_a_run(tmp_path: Path) -> None:
    files = shared_case("06-missing-slice", tmp_path / "in")
    vol = load_series(files)
    split = split_runs(vol)
    assert [r.run_slices for r in split.runs] == [(1, 2, 27), (3, 27, 27)]
    assert split.left_out == []


def test_ge_tilted_runs_unchanged() -> None:
    vol = load_series(sorted(shared_series("ct_head_ge_tilted_irregular").glob("*.dcm")))
    split = split_runs(vol)
    assert [r.run_slices for r in split.runs] == [(1, 14, 28), (15, 28, 28)] and split.left_out == []


def test_series_window_is_the_median_not_the_first_slice(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path, slices=5, size=16, step_mm=5.0, fov_mm=200.0)
    ds = pydicom.dcmread(files[0])
    ds.WindowCenter, ds.WindowWidth = 11, 22  # an edge slice of noise, windowed on itself
    ds.save_as(files[0], enforce_file_format=True)
    assert series_window(load_series(files)) == ([40.0], [80.0])


def test_series_window_of_the_mprage() -> None:
    files = sorted(shared_series("mr_t1_mprage_sag_siemens").glob("*.dcm"))
    vol = load_series(files)
    first = vol.datasets[0]
    assert (float(first.WindowCenter), float(first.WindowWidth)) == (11.0, 22.0)  # the noise slice
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    want = (float(np.median([float(h.WindowCenter) for h in heads])),
            float(np.median([float(h.WindowWidth) for h in heads])))
    win = series_window(vol)
    assert win == ([want[0]], [want[1]])
    # what a reader sees in the middle slice: the brain is not saturated (most tissue voxels inside the window)
    mid = vol.data[vol.shape[0] // 2]
    tissue = mid[mid > np.percentile(mid, 60)]
    inside = np.mean((tissue > want[0] - want[1] / 2) & (tissue < want[0] + want[1] / 2))
    assert inside > 0.8, inside


def test_photometric_interpretation_kept_or_refused(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path, slices=3, size=16, step_mm=5.0, fov_mm=200.0)
    assert series_photometric(load_series(files)) == ("MONOCHROME2", "")
    for f in files[:2]:
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f, enforce_file_format=True)
    # a mixed series cannot display like its source in one derived series: refused, never half inverted
    with pytest.raises(VolumeError, match="2 different PhotometricInterpretation values"):
        load_series(files)


def test_lone_steps_of_their_own_make_no_run(tmp_path: Path) -> None:
    # steps 5, 32, 4 with the x position drifting 20 mm a slice: no stretch is regular, every slice is named
    files = write_phantom_series(tmp_path, slices=4, size=16, step_mm=5.0, fov_mm=200.0)
    for k, (z, x) in enumerate(((0.0, -8.0), (5.0, 12.0), (37.0, 32.0), (41.0, 52.0))):
        _edit_position(files[k], [x, -8.0, z])
    split = split_runs(load_series(files))
    assert split.runs == [] and [x.index for x in split.left_out] == [1, 2, 3, 4]


def test_a_pair_off_the_series_line_is_not_a_run(tmp_path: Path) -> None:
    # slice 3 missing, and slices 1-2 shifted 3 mm sideways: their step matches, their line does not
    files = _phantom_missing(tmp_path, [0, 1, *range(3, 11)])
    for f in files[:2]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        _edit_position(f, [float(ds.ImagePositionPatient[0]) + 3 * (f == files[1]), float(ds.ImagePositionPatient[1]),
                           float(ds.ImagePositionPatient[2])])
    split = split_runs(load_series(files))
    assert [r.run_slices for r in split.runs] == [(3, 10, 10)]
    assert [x.index for x in split.left_out] == [1, 2]


def _edit_position(path: Path, ipp: list[float]) -> None:
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [f"{v:.6g}" for v in ipp]
    ds.save_as(path, enforce_file_format=True)
