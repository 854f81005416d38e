"""Images of different kinds or volumes that repeat no slice position are still not stacked into one volume
(fieldmr16): a DERIVED MIP slice beside the ORIGINAL ones, magnitude and phase at alternate positions, and two
echoes left together once two acquisitions that repeat the positions were told apart. Before, each made one volume
whose derived slices mixed two contrasts without a word."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.errors import VolumeError
from node.series import load_volumes
from tests.support.series import mr_variant, phantom_stack


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_stack(tmp_path_factory.mktemp("phantom"))


def _move(ds: pydicom.Dataset, mm: float) -> None:
    """Moves an image ``mm`` along the slice normal (the phantom is axial: +z)."""
    p = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [p[0], p[1], p[2] + mm]


def _scale(ds: pydicom.Dataset, factor: float) -> None:
    a = ds.pixel_array
    ds.PixelData = np.clip(a.astype(np.float64) * factor, 0, 4095).astype(a.dtype).tobytes()


def _kinds(vol: object) -> set[str]:
    return {"\\".join(str(v) for v in d.ImageType) for d in vol.datasets}  # type: ignore[attr-defined]


def test_a_derived_mip_slice_one_step_past_the_stack_is_not_stacked_with_the_original_slices(
        phantom: list[Path], tmp_path: Path) -> None:
    """A DERIVED\\SECONDARY\\MIP image (3x the signal) at the next step of an ORIGINAL stack: it was stacked as the
    stack's 7th slice (one volume of 7, the derived slices near it blending a projection into the anatomy)."""
    def original(ds: pydicom.Dataset, k: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]

    def mip(ds: pydicom.Dataset, k: int) -> None:
        ds.ImageType = ["DERIVED", "SECONDARY", "MIP"]
        _move(ds, 3.0)
        _scale(ds, 3.0)

    files = mr_variant(phantom, tmp_path, "o", original) + mr_variant(phantom[-1:], tmp_path, "mip", mip)
    try:
        vols = load_volumes(files)
    except VolumeError as e:  # refusing, naming the image type and the file, is safe too
        assert "ImageType" in str(e) and "mip-" in str(e), str(e)
        return
    assert all(len(_kinds(v)) == 1 for v in vols), [(v.volume_label, _kinds(v)) for v in vols]
    assert sorted((v.volume_label, v.shape[0]) for v in vols) == [("type DERIVED/SECONDARY/MIP", 1),
                                                                    ("type ORIGINAL/PRIMARY/M", 6)]


def test_magnitude_and_phase_at_alternate_positions_are_two_volumes(phantom: list[Path], tmp_path: Path) -> None:
    """Magnitude images at slices 1, 3, 5 and phase images at 2, 4, 6 of one series repeat no position: they were
    stacked into one volume of 6 whose contrast alternated M, P, M, P slice by slice."""
    def kind(k: int) -> str:
        return "M" if k % 2 == 0 else "P"

    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", kind(k), "ND"]
        if kind(k) == "P":
            _scale(ds, 0.25)

    vols = load_volumes(mr_variant(phantom, tmp_path, "mp", change))
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("type M", 3), ("type P", 3)]
    assert [_kinds(v) for v in vols] == [{"ORIGINAL\\PRIMARY\\M\\ND"}, {"ORIGINAL\\PRIMARY\\P\\ND"}]


def test_a_vendor_flag_past_the_third_image_type_value_does_not_split_a_stack(phantom: list[Path],
                                                                               tmp_path: Path) -> None:
    """GE writes ORIGINAL\\PRIMARY\\AXIAL\\ADD on some slices of one stack and ORIGINAL\\PRIMARY\\AXIAL on the others
    (the shared ct_head_ge_tilted_irregular: 14 and 14); Siemens ND / NORM / MOSAIC flags alike: one kind of image."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] + (["ADD"] if k < 3 else [])

    vols = load_volumes(mr_variant(phantom, tmp_path, "ge", change))
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("", 6)]


def test_two_echoes_are_not_left_together_in_each_of_two_acquisitions_that_repeat_the_positions(
        phantom: list[Path], tmp_path: Path) -> None:
    """Two acquisitions of one place, each of two echoes whose positions are offset by half a step: the repeats
    were explained by AcquisitionNumber alone (the fewest volumes), and each acquisition became one volume of 12
    slices at 1.5 mm alternating echo 1 and echo 2."""
    def tag(acq: int, echo: int) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.AcquisitionNumber = acq
            ds.EchoNumbers, ds.EchoTime = echo, f"{10.0 * echo:.1f}"
            _move(ds, 1.5 * (echo - 1))
            _scale(ds, 1.0 / echo)
        return change

    files = [p for a in (1, 2) for e in (1, 2) for p in mr_variant(phantom, tmp_path, f"a{a}e{e}", tag(a, e))]
    try:
        vols = load_volumes(files)
    except VolumeError as e:  # refusing, naming the echo, is safe too
        assert "echo" in str(e), str(e)
        return
    echoes = [{int(d.EchoNumbers) for d in v.datasets} for v in vols]
    assert all(len(e) == 1 for e in echoes), [(v.volume_label, v.shape) for v in vols]
    assert sorted((v.volume_label, v.shape[0]) for v in vols) == [
        ("acquisition 1 echo 1", 6), ("acquisition 1 echo 2", 6), ("acquisition 2 echo 1", 6),
        ("acquisition 2 echo 2", 6)]
