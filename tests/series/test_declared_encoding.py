"""What a header declares about its pixels must hold, or the series is refused naming the file (break13f): frames
the header does not count are never dropped without a word, a rescale stated only at the top level of an enhanced
object is applied, and pixels whose encoding cannot be read as a grey-scale image (PALETTE COLOR, a HighBit that is
not BitsStored - 1) are never super-resolved as if they were."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.app.check_cmd import check_folders
from node.app.phantom import write_phantom_series
from node.config import load_config
from node.process import process_series
from node.series import load_series, load_volumes
from tests.support.fixtures import shared_series
from tests.support.series import edited_phantom, refused


def _enhanced(tmp_path: Path, change: Callable[[Dataset], None]) -> list[Path]:
    """The shared enhanced MR (96 frames, one file), changed by ``change``, written to ``tmp_path/in``."""
    src = sorted(shared_series("mr_t1_enhanced_multiframe_siemens_xa30").glob("*.dcm"))
    ds = pydicom.dcmread(src[0])
    change(ds)
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    out = tmp_path / "in" / "MF.dcm"
    ds.save_as(out, enforce_file_format=True)
    return [out]


def test_number_of_frames_below_the_frames_present_is_refused_not_cut(tmp_path: Path) -> None:
    """NumberOfFrames 90 on an object whose per-frame functional groups and pixel data hold 96 frames: the last
    6 frames (12 mm of the head) were left out of the derived series, exit 0, only pydicom's warning."""
    def fewer(ds: Dataset) -> None:
        ds.NumberOfFrames = 90
    refused(_enhanced(tmp_path, fewer), tmp_path, "MF.dcm", "NumberOfFrames 90", "96")


def test_per_frame_groups_shorter_than_number_of_frames_names_the_counts(tmp_path: Path) -> None:
    def shorter(ds: Dataset) -> None:
        del ds.PerFrameFunctionalGroupsSequence[90:]
    refused(_enhanced(tmp_path, shorter), tmp_path, "MF.dcm", "NumberOfFrames 96", "90")


def test_pixel_data_holding_more_frames_than_declared_is_refused(tmp_path: Path) -> None:
    """The per-frame groups agree with NumberOfFrames (90), the pixel data holds 96 frames: pydicom returns all 96
    (with a warning); which 90 the groups describe cannot be told."""
    def fewer_groups(ds: Dataset) -> None:
        ds.NumberOfFrames = 90
        del ds.PerFrameFunctionalGroupsSequence[90:]
    refused(_enhanced(tmp_path, fewer_groups), tmp_path, "MF.dcm", "96 frames", "NumberOfFrames 90")


def test_single_frame_image_with_two_frames_of_pixels_is_named(tmp_path: Path) -> None:
    """A single-frame slice whose PixelData holds two images: refused as "a header value cannot be read
    (ValueError: could not broadcast ...)" naming the first file of the series, not the broken one."""
    files = write_phantom_series(tmp_path / "in", slices=6, size=32, step_mm=3.0)
    ds = pydicom.dcmread(files[3])
    ds.PixelData = ds.PixelData * 2
    ds.save_as(files[3])
    msg = refused(files, tmp_path, files[3].name, "2 frames")
    assert files[0].name not in msg


def test_enhanced_object_with_only_a_top_level_rescale_is_converted_with_it(tmp_path: Path) -> None:
    """No Pixel Value Transformation functional group, RescaleSlope 2 / RescaleIntercept -100 at the top level
    (converters write it there): the rescale was ignored (slope 1, intercept 0), every value wrong by 2x - 100."""
    def top_level(ds: Dataset) -> None:
        for item in ds.PerFrameFunctionalGroupsSequence:
            del item.PixelValueTransformationSequence
        ds.RescaleSlope = "2"
        ds.RescaleIntercept = "-100"
    files = _enhanced(tmp_path, top_level)
    vol = load_series(files)
    stored = pydicom.dcmread(files[0]).pixel_array.astype(np.float64)
    want = np.stack([stored[f - 1] for f in vol.frame_numbers]) * 2 - 100
    np.testing.assert_array_equal(vol.data, want.astype(np.float32))
    # srnode check's own reader applies it as well: the derived values equal the input's at acquired positions
    cfg = load_config(None)
    process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    result = check_folders(tmp_path / "in", tmp_path / "out", run_dciodvfy=False)
    assert result.ok and "values at acquired positions equal" in result.lines()[0], result.lines()


def test_a_functional_group_rescale_wins_over_a_top_level_one(tmp_path: Path) -> None:
    def both(ds: Dataset) -> None:
        ds.RescaleSlope = "2"
        ds.RescaleIntercept = "-100"
    files = _enhanced(tmp_path, both)
    vol = load_series(files)
    stored = pydicom.dcmread(files[0]).pixel_array.astype(np.float64)
    np.testing.assert_array_equal(vol.data, np.stack([stored[f - 1] for f in vol.frame_numbers]).astype(np.float32))


def _palette(k: int, ds: Dataset) -> None:
    ds.PhotometricInterpretation = "PALETTE COLOR"


def _high_bit_at_the_top(k: int, ds: Dataset) -> None:
    """12 stored bits in bits 4..15 (HighBit 15, an ACR-NEMA layout the standard retired): pydicom reads the low
    12 bits, garbage, and the derived series was that garbage, valid to every check."""
    a = ds.pixel_array.astype(np.uint16) << 4
    ds.HighBit = 15
    ds.PixelData = a.tobytes()


@pytest.mark.parametrize(("change", "reason"), [
    (_palette, "PhotometricInterpretation PALETTE COLOR"),
    (_high_bit_at_the_top, "HighBit 15 with BitsStored 12"),
])
def test_pixels_that_are_not_grey_scale_values_as_read_are_refused(tmp_path: Path,
                                                                   change: Callable[[int, Dataset], None],
                                                                   reason: str) -> None:
    files = edited_phantom(tmp_path, change)
    msg = refused(files, tmp_path, reason)
    assert files[0].name in msg


def _tilted(frames: tuple[int, ...]) -> Callable[[Dataset], None]:
    def tilt(ds: Dataset) -> None:
        for f in frames:
            item = ds.PerFrameFunctionalGroupsSequence[f].PlaneOrientationSequence[0]
            iop = [float(v) for v in item.ImageOrientationPatient]
            row, col = np.array(iop[:3]), np.array(iop[3:])
            a = np.radians(0.5)
            col = col * np.cos(a) + np.cross(row, col) * np.sin(a)
            item.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    return tilt


def test_a_refusal_about_one_frame_names_the_frame(tmp_path: Path) -> None:
    """Two frames of 96 tilted 0.5 deg: the refusal said "2 slice(s) ... (MF.dcm, MF.dcm)" and "(MF.dcm, MF.dcm,
    MF.dcm, ...)", naming no frame of the object. (One such frame alone is a stray plane, set aside by its frame
    since field18, ``tests/series/test_set_aside.py``.)"""
    msg = refused(_enhanced(tmp_path, _tilted((50, 51))), tmp_path, "2 slice(s)",
                   "(MF.dcm (frame 51), MF.dcm (frame 52))")
    assert "MF.dcm (frame 1), MF.dcm (frame 2), MF.dcm (frame 3), ..." in msg, msg


def test_one_stray_frame_is_set_aside_by_its_frame(tmp_path: Path) -> None:
    vols = load_volumes(_enhanced(tmp_path, _tilted((50,))))
    assert [w for v in vols[:1] for w, _, _ in v.set_aside] == ["MF.dcm (frame 51)"]
    assert sum(v.shape[0] for v in vols) == 95


def test_float_pixel_data_is_named_for_what_it_is(tmp_path: Path) -> None:
    """An image holding FloatPixelData was refused as "has no pixel data"."""
    def floating(k: int, ds: Dataset) -> None:
        ds.FloatPixelData = ds.pixel_array.astype("<f4").tobytes()
        del ds.PixelData
    refused(edited_phantom(tmp_path, floating), tmp_path, "CT0001.dcm: holds FloatPixelData")
