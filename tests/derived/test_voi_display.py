"""The display transform a source states beside (or instead of) its window: a VOI LUT Sequence (a table over
modality values), a VOI LUT Function (SIGMOID). field19, measured on 8 slices of the shared 5 mm phantom, written
MONOCHROME1 (shared case 04's kind): with a VOI LUT Sequence and no window, the derived series had neither (a
viewer falls back on the whole value range, -1024..3071 HU, where the source showed its table); with a SIGMOID
window, the derived series stated the window alone (shown LINEAR: at 0 HU black where the source shows 13.5 % grey),
exit 0, dciodvfy and ``srnode check`` clean. Now both are carried when every slice states them alike (they act on
modality values, which the derived series keeps whatever its own rescale)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.app.check_cmd import check_folders
from node.config import load_config
from node.process import process_series
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy

CT5 = "ct_head_phantom_philips_5mm"


def _table(ds: Dataset, top: int = 65535) -> None:
    del ds.WindowCenter, ds.WindowWidth
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]  # 256 entries from 0 HU, 16 bits
    lut.LUTData = np.linspace(0, top, 256).astype("<u2").tobytes()
    lut["LUTData"].VR = "OW"
    lut.LUTExplanation = "BRAIN TABLE"
    ds.VOILUTSequence = [lut]


def _cut(tmp_path: Path, change: Callable[[int, Dataset], None]) -> list[Path]:
    src = sorted(shared_series(CT5).glob("*.dcm"),
                 key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[10:18]
    folder = tmp_path / "in"
    folder.mkdir(parents=True)
    out = []
    for k, f in enumerate(src):
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        change(k, ds)
        ds.save_as(folder / f"CT{k + 1:04d}.dcm")
        out.append(folder / f"CT{k + 1:04d}.dcm")
    return out


def _derive(tmp_path: Path, files: list[Path]) -> list[Path]:
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert len(res.derived_files) == 15
    errors, _ = dciodvfy(res.derived_files[0])
    assert not errors, errors
    result = check_folders(files[0].parent, tmp_path / "out")
    assert result.ok, result.lines()
    return res.derived_files


def test_a_voi_lut_table_is_carried_to_the_derived_series(tmp_path: Path) -> None:
    files = _derive(tmp_path, _cut(tmp_path, lambda k, ds: _table(ds)))
    src = pydicom.dcmread(_cut(tmp_path / "again", lambda k, ds: _table(ds))[0]).VOILUTSequence[0]
    for f in (files[0], files[7]):
        ds = pydicom.dcmread(f)
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert "VOILUTSequence" in ds, f  # before: absent, no window either
        item = ds.VOILUTSequence[0]
        assert list(item.LUTDescriptor) == [256, 0, 16] and item.LUTExplanation == "BRAIN TABLE"
        assert bytes(item.LUTData) == bytes(src.LUTData)


def test_a_sigmoid_window_stays_sigmoid(tmp_path: Path) -> None:
    def sigmoid(k: int, ds: Dataset) -> None:
        ds.VOILUTFunction = "SIGMOID"
    files = _derive(tmp_path, _cut(tmp_path, sigmoid))
    ds = pydicom.dcmread(files[3])
    assert [float(x) for x in ds.WindowCenter] == [40.0, 40.0]
    assert ds.get("VOILUTFunction") == "SIGMOID"  # before: absent (LINEAR)


@pytest.mark.parametrize("which", ["two-tables", "one-without"])
def test_tables_or_functions_the_slices_do_not_share_are_not_carried(tmp_path: Path, which: str) -> None:
    def change(k: int, ds: Dataset) -> None:
        if which == "two-tables":
            _table(ds, 65535 if k < 4 else 30000)
        elif k != 2:
            _table(ds)
            ds.WindowCenter, ds.WindowWidth = "40", "80"
            ds.VOILUTFunction = "SIGMOID" if k % 2 else "LINEAR_EXACT"
    files = _derive(tmp_path, _cut(tmp_path, change))
    ds = pydicom.dcmread(files[0])
    assert "VOILUTSequence" not in ds and "VOILUTFunction" not in ds


@pytest.mark.parametrize("descriptor, entries", [(256, 256), ([256, 0], 256), ([256, 0, 16], 200),
                                                 ([256, 0, 40], 256)])
def test_a_malformed_voi_lut_table_is_not_carried_and_the_series_is_still_derived(
        tmp_path: Path, descriptor: object, entries: int) -> None:
    """review19: a VOI LUT item whose LUTDescriptor is not 3 values (VM 1: 256; VM 2), whose table does not hold
    the entries it declares, or whose bits per entry are not 1..16. Measured: the VM 1 descriptor failed the whole
    series (TypeError: 'int' object is not iterable, while comparing the slices' tables; before field19 the table
    was ignored and the series derived); the others were copied to every derived slice as they were, a table no
    reader can apply. Now such a table is not carried (as before field19) and the series is derived."""
    def change(k: int, ds: Dataset) -> None:
        lut = Dataset()
        lut.LUTDescriptor = descriptor
        lut.LUTData = np.linspace(0, 65535, entries).astype("<u2").tobytes()
        lut["LUTData"].VR = "OW"
        ds.VOILUTSequence = [lut]
    files = _derive(tmp_path, _cut(tmp_path, change))
    assert "VOILUTSequence" not in pydicom.dcmread(files[0])
