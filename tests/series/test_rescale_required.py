"""A CT (or PET) series whose images state no RescaleSlope / RescaleIntercept at all (Type 1 in the CT Image and PET
Image modules; in an enhanced CT's Pixel Value Transformation functional group) was read as slope 1 / intercept 0: the
phantom stored 0..4095 for -1024..3071 HU was derived 1024 HU off (values 24..2034 "HU" where the input meant
-1000..1010), exit 0, the derived CT stating slope 1 / intercept 0 valid to dciodvfy and to ``srnode check``. A
default is a guess: such a series is now refused before the engine, naming the images and the reason. An MR states
no rescale and keeps the identity (``test_rescale_stated.py``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.app.check_cmd import check_folders
from node.config import load_config
from node.process import process_series
from node.series import load_series
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy
from tests.support.series import edited_phantom, refused

PET_IMAGE = "1.2.840.10008.5.1.4.1.1.128"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _drop(*keywords: str, sop_class: str = "", modality: str = "") -> Callable[[int, Dataset], None]:
    def change(k: int, ds: Dataset) -> None:
        for kw in keywords:
            del ds[kw]
        if sop_class:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        if modality:
            ds.Modality = modality
    return change


def _refused(files: list[Path], tmp_path: Path, *reason: str) -> str:
    msg = refused(files, tmp_path, *reason)
    assert "PHANTOM" not in msg  # files named, never a patient value
    return msg


@pytest.mark.parametrize(("change", "keyword", "what"), [
    (_drop("RescaleSlope", "RescaleIntercept"), "RescaleSlope", "CT"),
    (_drop("RescaleSlope"), "RescaleSlope", "CT"),  # the intercept stated, the slope on none
    (_drop("RescaleIntercept", "RescaleType"), "RescaleIntercept", "CT"),
    (_drop("RescaleSlope", "RescaleIntercept", "RescaleType", sop_class=PET_IMAGE, modality="PT"),
     "RescaleSlope", "PET"),
    # a Secondary Capture saying CT would be derived as a CT Image object stating HU
    (_drop("RescaleSlope", "RescaleIntercept", sop_class=SECONDARY_CAPTURE), "RescaleSlope", "CT"),
])
def test_a_ct_or_pet_stating_no_rescale_on_any_image_is_refused(
        tmp_path: Path, change: Callable[[int, Dataset], None], keyword: str, what: str) -> None:
    files = edited_phantom(tmp_path, change, slices=8)
    _refused(files, tmp_path, f"{keyword} is absent on all 8 of its images", "CT0001.dcm",
             f"a {what} image must state")


def test_srnode_process_says_why_and_exits_1(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _drop("RescaleSlope", "RescaleIntercept"), slices=8)
    errors, _ = dciodvfy(files[0])  # the input is what dciodvfy calls invalid
    assert any("RescaleSlope" in e for e in errors) and any("RescaleIntercept" in e for e in errors), errors
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out),
                        "--engine", "cubic", "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "RescaleSlope is absent on all 8 of its images" in r.stdout, r.stdout
    assert not list(out.rglob("*.dcm"))


def _enhanced_ct(tmp_path: Path, keep_rescale: bool) -> list[Path]:
    """The shared enhanced MR (96 frames) relabelled Enhanced CT, its Pixel Value Transformation groups kept or
    removed from every frame."""
    src = sorted(shared_series("mr_t1_enhanced_multiframe_siemens_xa30").glob("*.dcm"))
    ds = pydicom.dcmread(src[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.Modality = "CT"
    for item in ds.PerFrameFunctionalGroupsSequence:
        if keep_rescale:
            item.PixelValueTransformationSequence[0].RescaleType = "HU"
        else:
            del item.PixelValueTransformationSequence
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    out = tmp_path / "in" / "MF.dcm"
    ds.save_as(out, enforce_file_format=True)
    return [out]


def test_an_enhanced_ct_whose_frames_state_no_rescale_is_refused(tmp_path: Path) -> None:
    _refused(_enhanced_ct(tmp_path, keep_rescale=False), tmp_path, "absent on all 96 of its images",
             "MF.dcm (frame 1)", "a CT image must state")


def test_an_enhanced_ct_whose_frames_state_their_rescale_still_loads(tmp_path: Path) -> None:
    vol = load_series(_enhanced_ct(tmp_path, keep_rescale=True))
    assert vol.data.shape[0] == 96 and vol.rescale_type == "HU"


def test_srnode_check_fails_a_derived_ct_whose_inputs_state_no_rescale(tmp_path: Path) -> None:
    """A derived CT made before this refusal (inputs without a rescale read as slope 1 / intercept 0): its values
    equal the inputs' stored values, so ``srnode check`` said OK. Simulated exactly: derived from inputs stating
    slope 1 / intercept 0, which are then removed from the inputs."""
    def identity(k: int, ds: Dataset) -> None:
        hu = ds.pixel_array.astype("int32") + int(ds.RescaleIntercept)
        ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 1, "1", "0"
        ds.PixelData = hu.astype("int16").tobytes()

    files = edited_phantom(tmp_path, identity, slices=8)
    out = tmp_path / "out"
    cfg = load_config(None)
    process_series(files, cfg.rules[0], cfg, out, engine_name="cubic")
    assert check_folders(files[0].parent, out, run_dciodvfy=False).ok
    for f in files[2:4]:
        ds = pydicom.dcmread(f)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(f)
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert not result.ok
    assert "2 of its 8 input image(s) state no RescaleSlope / RescaleIntercept (CT0003.dcm, ...)" in \
        result.lines()[0], result.lines()
