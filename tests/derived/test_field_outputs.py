"""Derived objects from inputs as some scanners write them: an 8-bit CT (BitsStored 8) was derived with BitsStored 8
and HighBit 7, which the CT Image IOD does not allow (12 to 16; dciodvfy: "Unrecognized enumerated value");
ImageOrientationPatient written with a norm of 0.9999 was copied into the derived series (dciodvfy: "not unit
vector"), one of norm 2.0 refused though its directions are plain. Now: BitsStored >= 12 for a derived CT, the
orientation taken and written as unit vectors, and ``srnode check`` compares unit vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from node.app.check_cmd import check_folders
from tests.support.peers import dciodvfy
from tests.support.series import edited_phantom


def _process(tmp_path: Path, change: Callable[[int, Dataset], None]) -> tuple[list[Path], Path]:
    files = edited_phantom(tmp_path, change, slices=8)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out),
                        "--engine", "cubic", "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return files, out


def _eight_bits(allocated: int) -> Callable[[int, Dataset], None]:
    def change(k: int, ds: Dataset) -> None:
        hu = apply_modality_lut(ds.pixel_array, ds)
        stored = np.clip(np.rint((hu + 1024) / 16), 0, 255)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, 8, 7
        ds.RescaleSlope, ds.RescaleIntercept = 16, -1024
        ds.PixelData = stored.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    return change


@pytest.mark.parametrize("allocated", [8, 16])
def test_an_8_bit_ct_is_derived_with_at_least_12_stored_bits(tmp_path: Path, allocated: int) -> None:
    files, out = _process(tmp_path, _eight_bits(allocated))
    derived = sorted(out.rglob("derived/*.dcm"))
    first = pydicom.dcmread(derived[0])
    assert (int(first.BitsAllocated), int(first.BitsStored), int(first.HighBit)) == (16, 12, 11)
    source = pydicom.dcmread(files[0])
    assert np.array_equal(apply_modality_lut(first.pixel_array, first), apply_modality_lut(source.pixel_array, source))
    errors, _ = dciodvfy(derived[0])
    assert not errors, errors
    assert check_folders(files[0].parent, out, run_dciodvfy=False).ok


@pytest.mark.parametrize("norm", [0.9999, 2.0])
def test_an_orientation_of_another_norm_is_written_as_unit_vectors(tmp_path: Path, norm: float) -> None:
    def change(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [norm, 0, 0, 0, norm, 0]

    files, out = _process(tmp_path, change)
    derived = sorted(out.rglob("derived/*.dcm"))
    for p in (derived[0], derived[-1]):
        assert [float(v) for v in pydicom.dcmread(p).ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    errors, _ = dciodvfy(derived[0])
    assert not errors, errors
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert result.ok, result.lines()
    report = json.loads(next(out.rglob("report.json")).read_text())
    assert "ImageOrientationPatient of 8 image(s) written with vectors not of unit length" in json.dumps(report)
