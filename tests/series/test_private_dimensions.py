"""Volumes told apart only by vendors' private elements (fieldmr16): GE and Philips diffusion series whose b-value
and gradient direction are in private elements only (GE (0043,1039) and (0019,10BB-BD); Philips (2001,1003) and
(2005,10B0-B2)), and GE magnitude and phase images with one ImageType, told by GE's image component (0043,102F).
Before, each was refused: "repeats that no dimension tells apart"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.errors import VolumeError
from node.series import load_volumes
from tests.support.series import mr_variant, phantom_stack


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_stack(tmp_path_factory.mktemp("phantom"))


def _ge_dwi(b: float, g: tuple[float, float, float]) -> Callable[[pydicom.Dataset, int], None]:
    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ScanningSequence = ["EP", "SE"]
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [f"{b:.0f}", "8", "0", "0"])
        acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        for offset, v in zip((0xBB, 0xBC, 0xBD), g, strict=True):
            acq.add_new(offset, "DS", f"{v:g}")
    return change


def _philips_dwi(b: float, g: tuple[float, float, float]) -> Callable[[pydicom.Dataset, int], None]:
    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.Manufacturer = "Philips Medical Systems"
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", b)
        mr = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        for offset, v in zip((0xB0, 0xB1, 0xB2), g, strict=True):
            mr.add_new(offset, "FL", v)
    return change


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
@pytest.mark.parametrize("vendor", ["GE", "GE multi-b bias", "Philips"])
def test_diffusion_told_only_by_private_elements_is_split_by_b_value_and_direction(
        phantom: list[Path], tmp_path: Path, vendor: str, implicit: bool) -> None:
    make = _philips_dwi if vendor == "Philips" else _ge_dwi
    bias = 1e9 if vendor == "GE multi-b bias" else 0.0  # GE adds 10^9 to each b-value of a multi-b scan
    files = (mr_variant(phantom, tmp_path, "b0", make(bias + 0, (0.0, 0.0, 0.0)), implicit)
             + mr_variant(phantom, tmp_path, "bx", make(bias + 1000, (1.0, 0.0, 0.0)), implicit)
             + mr_variant(phantom, tmp_path, "by", make(bias + 1000, (0.0, 1.0, 0.0)), implicit))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("b=0", 6), ("b=1000 dir 1", 6), ("b=1000 dir 2", 6)]
    origins = [{v.datasets.record(k).file.name[:2] for k in range(6)} for v in vols]  # type: ignore[union-attr]
    assert origins == [{"b0"}, {"by"}, {"bx"}]  # directions ranked by value: (0, 1, 0) before (1, 0, 0)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
def test_ge_magnitude_and_phase_with_one_image_type_are_two_volumes(phantom: list[Path], tmp_path: Path,
                                                                    implicit: bool) -> None:
    def component(c: int) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.Manufacturer = "GE MEDICAL SYSTEMS"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", c)
        return change

    files = (mr_variant(phantom, tmp_path, "mag", component(0), implicit)
             + mr_variant(phantom, tmp_path, "pha", component(1), implicit))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("type M", 6), ("type P", 6)]


def test_a_ge_slop_value_outside_diffusion_scans_is_no_b_value(phantom: list[Path], tmp_path: Path) -> None:
    """GE writes (0043,1039) on every MR image; outside a diffusion scan (not EPI, no diffusion directions in
    (0019,10E0)) its first value is no b-value: a non-EPI stack whose value changes at interleaved slices stays one
    stack (read as b-values, it was split into two volumes at twice the step)."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ScanningSequence = ["GR"]
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [str(k % 2), "0", "0", "0"])
        ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0xE0, "DS", "0")

    vols = load_volumes(mr_variant(phantom, tmp_path, "t1", change))
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("", 6)]


def _ge_component(c: int | None) -> Callable[[pydicom.Dataset, int], None]:
    """A GE MR image, ImageType ORIGINAL\\PRIMARY\\OTHER, with image component ``c`` in (0043,102F) (None: the
    element absent, as on images whose private elements were removed on their way)."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        if c is not None:
            ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", c)
    return change


def test_a_ge_stack_with_its_image_component_absent_on_some_images_stays_one_volume(
        phantom: list[Path], tmp_path: Path) -> None:
    """break16: (0043,102F) absent on 3 of the 6 images of one magnitude stack (private elements removed from some
    instances on their way). Before, an image without it was a kind of its own: ORIGINAL\\PRIMARY\\OTHER and
    ORIGINAL\\PRIMARY\\OTHER + M, two interleaved volumes 'type ORIGINAL/PRIMARY/OTHER' and 'type M' at twice the
    step (the GE 3D T1 cut to 20 slices, every other one without it, likewise). Now the absent component is
    unknown, not another value: the images take the one component the others state (a note says how many)."""
    files = [f for k, f in enumerate(mr_variant(phantom, tmp_path, "m", _ge_component(0)))
             if k % 2 == 0] + [f for k, f in enumerate(mr_variant(phantom, tmp_path, "x", _ge_component(None)))
                               if k % 2 == 1]
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("", 6)]
    assert any("3 image(s) without ImageType" in n and "image kind" in n for n in vols[0].notes), vols[0].notes


def test_ge_magnitude_and_phase_beside_images_without_their_component_are_refused_naming_them(
        phantom: list[Path], tmp_path: Path) -> None:
    """Magnitude and phase stacks (0043,102F 0 and 1) and a seventh image at a position of its own without the
    component: which of the two it belongs to cannot be told; refused naming its file (before: a third kind,
    'type ORIGINAL/PRIMARY/OTHER', a volume of one image)."""
    mag = mr_variant(phantom, tmp_path, "mag", _ge_component(0))
    pha = mr_variant(phantom, tmp_path, "pha", _ge_component(1))
    ds = pydicom.dcmread(mag[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [float(v) - 9.0 for v in ds.ImagePositionPatient]  # one position of its own
    del ds[ds.private_block(0x0043, "GEMS_PARM_01").get_tag(0x2F)]
    lone = tmp_path / "lone.dcm"
    ds.save_as(lone, enforce_file_format=True)
    with pytest.raises(VolumeError) as e:
        load_volumes([*mag, *pha, lone])
    msg = str(e.value)
    assert "lone.dcm" in msg and "cannot be told" in msg, msg
