"""``srnode check`` placed a Siemens mosaic's tile k at the protocol's slice k (sSliceArray.asSlice[k]). Siemens
stores the tiles in spatial order; the protocol lists its slices in its own order, which may run the other way (a
protocol placed head to foot). The shared EPI mosaic (60 tiles, 2.4 mm) with its sSliceArray listed in reverse:
the node (nibabel's tile order, the protocol's step) derived it exactly as the plain mosaic, but ``srnode check``
FAILED the right series ("derived slice IM00001.dcm is 142 mm off its place", values differing by up to 1.4e4).
Now the check takes the protocol's centres along the slice normal from the end nearest the mosaic's first tile.
The acquisition order (ucMode 1 ascending, 2 descending, 4 interleaved) leaves the list in spatial order and
changes nothing. A derived series whose slices are placed in the wrong order still FAILS."""

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
from tests.support.fixtures import shared_series

N = 60


def _ascconv(ds: Dataset, edit: Callable[[str], str]) -> None:
    for elem in ds:
        if elem.tag.group == 0x0029 and isinstance(elem.value, bytes) and b"ASCCONV" in elem.value:
            elem.value = edit(elem.value.decode("latin-1")).encode("latin-1")


def _reversed(ds: Dataset) -> None:
    def edit(text: str) -> str:
        return re.sub(r"sSliceArray\.asSlice\[(\d+)\]", lambda m: f"sSliceArray.asSlice[{N - 1 - int(m.group(1))}]",
                      text)
    _ascconv(ds, edit)


def _mode(value: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        _ascconv(ds, lambda t: re.sub(r"(sSliceArray\.ucMode\s*=\s*)\S+", rf"\g<1>{value}", t))
    return change


def _derive(tmp_path: Path, change: Callable[[Dataset], None] | None) -> tuple[Path, Path]:
    ds = pydicom.dcmread(sorted(shared_series("mr_epi_mosaic_siemens_single").glob("*.dcm"))[0])
    if change is not None:
        change(ds)
    src = tmp_path / "in"
    src.mkdir(parents=True)
    ds.save_as(src / "MOSAIC.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(src), str(out), "--engine", "cubic",
                        "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return src, out


def _positions(out: Path) -> np.ndarray:
    files = sorted(out.rglob("derived/*.dcm"))
    return np.array([[float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient]
                     for f in files])


@pytest.mark.parametrize("change", [_reversed, _mode(2), _mode(1)], ids=["listed-reversed", "ucMode-2", "ucMode-1"])
def test_check_passes_a_right_series_whatever_order_the_protocol_lists_its_slices(
        tmp_path: Path, change: Callable[[Dataset], None]) -> None:
    _, plain = _derive(tmp_path / "plain", None)
    src, out = _derive(tmp_path / "edited", change)
    np.testing.assert_allclose(_positions(out), _positions(plain), atol=1e-6)  # the node: nibabel's tile order
    result = check_folders(src, out, run_dciodvfy=False)
    assert result.ok, result.lines()  # before (listed reversed): FAILED, 142 mm off


def test_check_still_fails_a_series_placed_in_the_wrong_order(tmp_path: Path) -> None:
    src, out = _derive(tmp_path / "wrong", _reversed)
    files = sorted(out.rglob("derived/*.dcm"))
    pos = _positions(out)
    for f, p in zip(files, pos[::-1], strict=True):  # every slice at its mirror's place
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in p]
        ds.save_as(f)
    result = check_folders(src, out, run_dciodvfy=False)
    assert not result.ok
    assert "off its place" in result.lines()[0] or "differ" in result.lines()[0], result.lines()
