"""PixelPaddingValue is read as the bit pattern of the pixel representation, whatever VR it was written with: -2000
of signed pixels written as US (64536) or 65535 of unsigned pixels written as SS (-1) matched no pixel, and the
padding was derived as values (a ring of -2000 or 64511 HU around the head), valid to every check."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from node.app.check_read import _padding
from node.series import load_series
from tests.support.series import edited_phantom


def _outside(ds: Dataset) -> np.ndarray:
    yy, xx = np.mgrid[:ds.Rows, :ds.Columns]
    return (yy - 16) ** 2 + (xx - 16) ** 2 > 15 ** 2  # type: ignore[no-any-return]


def _signed(vr: str, value: object) -> Callable[[int, Dataset], None]:
    def change(k: int, ds: Dataset) -> None:
        hu = apply_modality_lut(ds.pixel_array, ds).astype(np.int16)
        hu[_outside(ds)] = -2000
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 1, 16, 15, 0
        ds.PixelData = hu.tobytes()
        ds.add_new(0x00280120, vr, value)
    return change


def _unsigned(vr: str, value: object) -> Callable[[int, Dataset], None]:
    def change(k: int, ds: Dataset) -> None:
        px = ds.pixel_array.astype(np.uint16)
        px[_outside(ds)] = 65535
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = px.tobytes()
        ds.add_new(0x00280120, vr, value)
    return change


@pytest.mark.parametrize("change", [
    _signed("US", 63536),  # -2000's 16 bits written as US
    _signed("SS", -2000),  # as it should be: unchanged
    _signed("OB", struct.pack("<h", -2000)),  # raw bytes
    _unsigned("SS", -1),  # 65535's 16 bits written as SS
    _unsigned("US", 65535),
], ids=["signed-as-US", "signed-as-SS", "signed-as-OB", "unsigned-as-SS", "unsigned-as-US"])
def test_padding_is_read_as_the_pixels_bit_pattern(tmp_path: Path, change: Callable[[int, Dataset], None]) -> None:
    files = edited_phantom(tmp_path, change, slices=8)
    ds = pydicom.dcmread(files[0])
    vol = load_series(files)
    outside = _outside(ds)
    assert np.all(vol.data[:, outside] == -1000.0)  # padding: air, not -2000 or 64511 HU
    assert float(vol.data.max()) < 3072 and float(vol.data.min()) >= -1024
    assert any(n.startswith("PixelPaddingValue voxels (") for n in vol.notes)
    pad = _padding(ds)  # srnode check's own reader agrees
    assert pad is not None and int(ds.pixel_array[0, 0]) in range(pad[0], pad[1] + 1)
