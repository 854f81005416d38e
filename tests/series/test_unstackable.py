"""Inputs that cannot be one volume are refused with the reason, never stacked or blended into a derived series:
several frames of reference, modalities or grey-scale polarities in one series; an orientation that is not two
orthogonal unit vectors; a non-finite position; a rescale slope of 0. And a Japanese ISO 2022 series (empty first
character-set value) is derived with its character set and names intact."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.config import UncertaintyObject, load_config, replace
from node.errors import VolumeError
from node.process import process_series
from node.series import load_volumes
from tests.support.engines import SIGMA_TEST_ENGINE, sigma_engines
from tests.support.peers import dciodvfy
from tests.support.series import edited_phantom


def _series(tmp_path: Path, change: Callable[[int, Dataset], None], slices: int = 8) -> list[Path]:
    return edited_phantom(tmp_path, change, slices)


def _frame_of_reference(k: int, ds: Dataset) -> None:
    if k >= 4:
        ds.FrameOfReferenceUID = generate_uid()


def _modality(k: int, ds: Dataset) -> None:
    if k >= 4:
        ds.Modality = "MR"


def _photometric(k: int, ds: Dataset) -> None:
    if k < 4:
        ds.PhotometricInterpretation = "MONOCHROME1"


def _not_unit(k: int, ds: Dataset) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 0.5, 0.5, 0]


def _zero_iop(k: int, ds: Dataset) -> None:
    ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]


def _inf_position(k: int, ds: Dataset) -> None:
    if k == 3:
        ds.ImagePositionPatient = [0, 0, "inf"]


def _slope_zero(k: int, ds: Dataset) -> None:
    ds.RescaleSlope = "0"


@pytest.mark.parametrize(("change", "reason"), [
    (_frame_of_reference, "different FrameOfReferenceUID values"),
    (_modality, "2 different Modality values"),
    (_photometric, "2 different PhotometricInterpretation values"),
    (_not_unit, "is not two orthogonal unit vectors"),
    (_zero_iop, "is not two orthogonal unit vectors"),
    (_inf_position, "is not three finite numbers"),
    (_slope_zero, "a slope of 0 maps every pixel to one value"),
])
def test_unstackable_series_is_refused_with_its_reason(tmp_path: Path, change: Callable[[int, Dataset], None],
                                                       reason: str) -> None:
    files = _series(tmp_path, change)
    with pytest.raises(VolumeError) as exc:
        load_volumes(files)
    assert reason in str(exc.value)
    cfg = load_config(None)
    with pytest.raises(VolumeError):
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert not list((tmp_path / "out").rglob("*.dcm")), "nothing may be derived from an unstackable series"


def test_iso_2022_japanese_series_keeps_its_character_set_and_names(tmp_path: Path) -> None:
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"

    def japanese(k: int, ds: Dataset) -> None:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = name
        ds.SeriesDescription = "頭部"

    files = _series(tmp_path, japanese, slices=4)
    cfg = load_config(None)
    cfg = replace(cfg, derive=dataclasses.replace(cfg.derive, uncertainty=UncertaintyObject.BOTH))
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    assert [p.name for p in res.uncertainty_files] == ["PM00001.dcm", "SC00001.dcm"]  # the map and the card
    for path in (res.derived_files[0], *res.uncertainty_files):
        ds = pydicom.dcmread(path)
        assert list(ds.SpecificCharacterSet) == ["", "ISO 2022 IR 87"], path
        assert str(ds.PatientName) == name and str(ds.SeriesDescription).startswith("頭部"), path
        errors, _ = dciodvfy(path)
        assert not errors, f"{path.name}: {errors}"
    assert hd.pm.ParametricMap.from_dataset(pydicom.dcmread(res.uncertainty_files[0])).PatientName == name


def test_a_streaming_load_refuses_in_the_order_of_reading_every_header_first(tmp_path: Path) -> None:
    """The load lets go of each header as it reads it (issue #15 item 5), yet refuses as when every file was read
    first: an unreadable file named last still comes before a non-image object named first; a slice of another
    series comes before pixel data that cannot be decoded (decoded only after the stack's checks); a slope of 0
    (each slice's rescale, checked once all are made) before the pixels of another slice."""
    def non_image_first(k: int, ds: Dataset) -> None:
        if k == 0:
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    files = _series(tmp_path / "a", non_image_first)
    files[-1].write_bytes(b"not DICOM at all")
    with pytest.raises(VolumeError, match=f"{files[-1].name}: not a readable DICOM file"):
        load_volumes(files)

    def other_series_and_broken_pixels(k: int, ds: Dataset) -> None:
        if k == 1:
            ds.PixelData = ds.PixelData[:10]  # cannot be decoded
        if k == 6:
            ds.SeriesInstanceUID = generate_uid()
    with pytest.raises(VolumeError, match="different series"):
        load_volumes(_series(tmp_path / "b", other_series_and_broken_pixels))

    def broken_pixels_then_zero_slope(k: int, ds: Dataset) -> None:
        if k == 1:
            ds.PixelData = ds.PixelData[:10]
        if k == 5:
            ds.RescaleSlope = 0
    with pytest.raises(VolumeError, match="RescaleSlope 0"):
        load_volumes(_series(tmp_path / "c", broken_pixels_then_zero_slope))
    with pytest.raises(VolumeError, match="pixel data cannot be decoded"):
        load_volumes(_series(tmp_path / "d", lambda k, ds: setattr(ds, "PixelData", ds.PixelData[:10])
                             if k == 3 else None))


def test_two_frames_of_reference_with_one_geometry_are_refused_saying_what_to_do(tmp_path: Path) -> None:
    """field19: 8 slices of the shared 5 mm phantom, 4 of them under a new FrameOfReferenceUID, positions unchanged
    (one regular stack to the eye; a de-identifier rewriting the UID image by image does this). Still refused, by
    ``srnode process`` (exit 1, nothing derived); before, the line said only "they cannot be stacked into one
    volume", not why positions that look continuous are not enough nor what to do."""
    import subprocess
    import sys

    from tests.support.fixtures import shared_series

    src = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"),
                 key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[10:18]
    folder = tmp_path / "in"
    folder.mkdir()
    other = generate_uid()
    for k, f in enumerate(src):
        ds = pydicom.dcmread(f)
        if k >= 4:
            ds.FrameOfReferenceUID = other
        ds.save_as(folder / f"CT{k + 1:04d}.dcm")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(folder), str(out), "--engine", "cubic",
                        "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    [line] = [x for x in r.stdout.splitlines() if "FAILED" in x]
    assert "2 different FrameOfReferenceUID values" in line and "(CT0005.dcm, CT0006.dcm, CT0007.dcm, CT0008.dcm)" \
        in line, line
    assert "the patient may have moved" in line and "restore the original value and send the series again" in line \
        and "send the images of each frame of reference as a series of their own" in line, line
    assert other not in line  # named by file, never by value
    assert not list(out.rglob("*.dcm"))
