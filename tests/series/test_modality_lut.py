"""A Modality LUT Sequence (0028,3000) maps stored values to modality values through a table (PS3.3 C.11.1); it was
ignored (the stored values read as slope 1 / intercept 0): the 5 mm phantom with a table of 16 x stored was derived
up to 30510 off, exit 0, valid to every check. srnode does not apply such tables: the series is refused, naming
the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.config import load_config
from node.errors import VolumeError
from node.process import process_series
from node.series import load_volumes
from tests.support.series import edited_phantom


def _table(k: int, ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "HU"
    item.LUTData = (np.arange(4096, dtype=np.uint16) * 16).tobytes()
    item["LUTData"].VR = "OW"
    ds.ModalityLUTSequence = Sequence([item])
    for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
        del ds[kw]


def test_a_modality_lut_sequence_is_refused_not_ignored(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _table, slices=8)
    with pytest.raises(VolumeError) as exc:
        load_volumes(files)
    assert "CT0001.dcm: has a Modality LUT Sequence (0028,3000)" in str(exc.value)
    cfg = load_config(None)
    with pytest.raises(VolumeError, match="Modality LUT Sequence"):
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
