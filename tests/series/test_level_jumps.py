"""A slice whose level jumps away from both neighbours (the shared GE 3D T1's InstanceNumber 66 is stored 5x
brighter than the slices around it): derived as stored, but said, naming the image. Before, nothing said it, and
the derived slices around it carried the jump (eval of a crop: engine -0.43 dB under cubic there, σ covering 0.557
of its 95 % interval; docs/engines.md, 2026-12-03 (b))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.series import load_volumes
from tests.support.fixtures import shared_series
from tests.support.series import edited_phantom


def _brighter(k_bright: int, factor: float) -> object:
    def change(k: int, ds: Dataset) -> None:
        if k == k_bright:
            arr = ds.pixel_array.astype(np.float64)
            slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            hu = arr * slope + icpt
            # the body (above -500 HU) factor x further from air, as a scaling the header does not state would
            body = hu > -500
            hu[body] = -1000 + (hu[body] + 1000) * factor
            stored = np.clip(np.round((hu - icpt) / slope), 0, 2 ** int(ds.BitsStored) - 1)
            ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
    return change


def test_a_slice_five_times_brighter_than_its_neighbours_is_named(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _brighter(3, 5.0), slices=7)  # type: ignore[arg-type]
    [vol] = load_volumes(files)
    jumps = [n for n in vol.notes if "level is" in n]
    assert len(jumps) == 1, vol.notes
    assert files[3].name in jumps[0]
    # derived as stored: slice 3's values are its own stored values after its own rescale, not corrected
    ds = pydicom.dcmread(files[3])
    z = [i for i, n in enumerate(vol.names) if n == files[3].name][0]
    want = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(vol.data[z], want)


def test_a_darker_slice_is_named_too(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _brighter(2, 0.3), slices=6)  # type: ignore[arg-type]
    [vol] = load_volumes(files)
    assert [n for n in vol.notes if "level is" in n and files[2].name in n], vol.notes


def test_a_smooth_stack_has_no_note(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, lambda k, ds: None, slices=7)
    [vol] = load_volumes(files)
    assert not [n for n in vol.notes if "level is" in n], vol.notes


def test_the_real_ge_series_bright_slice_is_named_and_the_real_phantom_has_none() -> None:
    ge = sorted(p for p in shared_series("mr_t1_3d_axial_ge").rglob("*") if p.is_file())
    [vol] = load_volumes([p for p in ge if p.suffix == ".dcm"])
    jumps = [n for n in vol.notes if "level is" in n]
    assert len(jumps) == 1 and "i270.MRDC.66.dcm" in jumps[0], jumps
    ph = sorted(p for p in shared_series("ct_head_phantom_philips_1mm").rglob("*") if p.is_file())
    [vol] = load_volumes(ph)
    assert not [n for n in vol.notes if "level is" in n], vol.notes
