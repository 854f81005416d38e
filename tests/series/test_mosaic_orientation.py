"""A Siemens mosaic whose ImageOrientationPatient vectors are not of unit length (a vendor's 0.9999, a converter's
2.0): field16 took a classic image's directions as unit vectors, but the mosaic split handed the vectors as written to
nibabel, whose check of the CSA slice normal against them failed: the shared EPI mosaic (60 slices) was refused as
"the CSA SliceNormalVector ... is not perpendicular to ImageOrientationPatient", and past that check its offset from
the mosaic's corner to the first tile scales with their norm (measured with nibabel: 0.076 mm off at 0.9999, 756 mm
at 2.0). Now the split is given the unit vectors of their directions: the tiles lie where the unit-vector mosaic puts
them, derived like it; directions that are not orthogonal are still refused, naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.app.check_cmd import check_folders
from node.errors import VolumeError
from node.series import load_series
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy


def _mosaic(tmp_path: Path, scale: list[float] | None = None, iop: list[float] | None = None) -> Path:
    src = sorted(shared_series("mr_epi_mosaic_siemens_single").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    if scale is not None:
        ds.ImageOrientationPatient = [float(v) * scale[i // 3] for i, v in enumerate(ds.ImageOrientationPatient)]
    if iop is not None:
        ds.ImageOrientationPatient = iop
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    out = tmp_path / "in" / "MOSAIC.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("scale", [[0.9999, 0.9999], [2.0, 2.0], [1.0, 0.5]])
def test_a_mosaic_with_orientation_vectors_of_another_norm_is_placed_as_with_unit_vectors(
        tmp_path: Path, scale: list[float]) -> None:
    ref = load_series([_mosaic(tmp_path / "ref")])
    vol = load_series([_mosaic(tmp_path, scale)])
    assert vol.shape == ref.shape == (60, 90, 90)
    np.testing.assert_allclose(vol.positions, ref.positions, atol=1e-6)
    np.testing.assert_array_equal(vol.data, ref.data)
    assert vol.row_cosine.tolist() == [1.0, 0.0, 0.0] and vol.col_cosine.tolist() == [0.0, 1.0, 0.0]
    assert any("not of unit length" in n for n in vol.notes)


def test_a_mosaic_written_with_a_norm_of_two_is_derived_and_checked(tmp_path: Path) -> None:
    f = _mosaic(tmp_path, [2.0, 2.0])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(f.parent), str(out), "--engine", "cubic",
                        "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    derived = sorted(out.rglob("derived/*.dcm"))
    assert len(derived) == 119  # 60 tiles, x2 through-plane
    for p in (derived[0], derived[-1]):
        assert [float(v) for v in pydicom.dcmread(p).ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    errors, _ = dciodvfy(derived[0])
    assert not errors, errors
    result = check_folders(f.parent, out, run_dciodvfy=False)
    assert result.ok, result.lines()
    assert "not of unit length" in json.dumps(json.loads(next(out.rglob("report.json")).read_text()))


def test_a_mosaic_whose_directions_are_not_orthogonal_is_refused_naming_it(tmp_path: Path) -> None:
    f = _mosaic(tmp_path, iop=[1, 0, 0, 0.5, 1, 0])
    with pytest.raises(VolumeError, match=r"MOSAIC\.dcm: ImageOrientationPatient .* is not two orthogonal unit "
                                          r"vectors"):
        load_series([f])
