"""The step between a Siemens mosaic's tiles came from SpacingBetweenSlices, else SliceThickness (nibabel), never
checked against the slice positions of the scanner's protocol (the CSA series header's sSliceArray, which ``srnode
check`` reads): the shared EPI mosaic (60 tiles, protocol step 2.4 mm) with SpacingBetweenSlices 3.0, or without it
and SliceThickness 3.0 (a slice gap left out), was derived with its last tile 35.4 mm off, exit 0 (``srnode check``
FAILED it). Now the protocol's step is used; a SpacingBetweenSlices contradicting it, or no step at all, is refused
naming the file."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.app.check_cmd import check_folders
from node.errors import VolumeError
from node.series import load_series
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy


def _mosaic(tmp_path: Path, change: Callable[[Dataset], None] | None = None) -> Path:
    src = sorted(shared_series("mr_epi_mosaic_siemens_single").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    if change is not None:
        change(ds)
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    out = tmp_path / "in" / "MOSAIC.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def _no_spacing(ds: Dataset) -> None:
    del ds.SpacingBetweenSlices
    ds.SliceThickness = "3.0"  # thicker than the step: nibabel took it as the step


def _no_protocol(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.tag.group == 0x0029 and isinstance(elem.value, bytes) and b"ASCCONV" in elem.value:
            del ds[elem.tag]


def test_without_spacing_between_slices_the_protocol_step_places_the_tiles(tmp_path: Path) -> None:
    ref = load_series([_mosaic(tmp_path / "ref")])
    f = _mosaic(tmp_path, _no_spacing)
    vol = load_series([f])
    np.testing.assert_allclose(vol.positions, ref.positions, atol=1e-6)
    assert np.allclose(np.diff(vol.positions[:, 2]), 2.4, atol=1e-4)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(f.parent), str(out), "--engine", "cubic",
                        "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    derived = sorted(out.rglob("derived/*.dcm"))
    assert float(pydicom.dcmread(derived[0]).SpacingBetweenSlices) == pytest.approx(1.2)
    errors, _ = dciodvfy(derived[0])
    assert not errors, errors
    result = check_folders(f.parent, out, run_dciodvfy=False)  # its reader places tiles from the protocol
    assert result.ok, result.lines()


@pytest.mark.parametrize(("change", "reason"), [
    (lambda ds: setattr(ds, "SpacingBetweenSlices", "3.0"),
     "SpacingBetweenSlices 3 mm contradicts the 2.4 mm between the slice positions of its protocol"),
    (lambda ds: (_no_protocol(ds), _no_spacing(ds)),
     "SpacingBetweenSlices is absent and its CSA series header gives no slice positions"),
])
def test_a_mosaic_whose_tile_step_is_contradicted_or_unknown_is_refused(
        tmp_path: Path, change: Callable[[Dataset], None], reason: str) -> None:
    with pytest.raises(VolumeError) as exc:
        load_series([_mosaic(tmp_path, change)])
    assert "MOSAIC.dcm: Siemens mosaic" in str(exc.value) and reason in str(exc.value), str(exc.value)


def test_spacing_between_slices_alone_still_places_the_tiles(tmp_path: Path) -> None:
    """No protocol text (a converter dropped the CSA series header): SpacingBetweenSlices, as before."""
    ref = load_series([_mosaic(tmp_path / "ref")])
    vol = load_series([_mosaic(tmp_path, _no_protocol)])
    np.testing.assert_allclose(vol.positions, ref.positions, atol=1e-5)


def _protocol_tra(ds: Dataset, edit: Callable[[int, float], float]) -> None:
    """Each protocol slice's dTra (sSliceArray.asSlice[k].sPosition.dTra) replaced by ``edit(k, value)``."""
    for elem in list(ds):
        if elem.tag.group == 0x0029 and isinstance(elem.value, bytes) and b"ASCCONV" in elem.value:
            text = elem.value.decode("latin-1")
            text = re.sub(r"(sSliceArray\.asSlice\[(\d+)\]\.sPosition\.dTra\s*=\s*)([-+0-9.eE]+)",
                          lambda m: f"{m.group(1)}{edit(int(m.group(2)), float(m.group(3))):.11g}", text)
            elem.value = text.encode("latin-1")


def test_a_protocol_listing_its_slices_the_other_way_still_places_the_tiles(tmp_path: Path) -> None:
    ref = load_series([_mosaic(tmp_path / "ref")])
    vol = load_series([_mosaic(tmp_path, lambda ds: _protocol_tra(ds, lambda k, v: 13.4527 - v))])
    np.testing.assert_allclose(vol.positions, ref.positions, atol=1e-6)


def test_a_protocol_whose_slices_are_not_evenly_spaced_is_refused(tmp_path: Path) -> None:
    f = _mosaic(tmp_path, lambda ds: _protocol_tra(ds, lambda k, v: v + (1.0 if k == 30 else 0.0)))
    with pytest.raises(VolumeError, match=r"MOSAIC\.dcm: Siemens mosaic .* are not evenly spaced along the slice "
                                          r"normal"):
        load_series([f])
