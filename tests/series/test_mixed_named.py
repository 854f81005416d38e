"""A series whose images differ in PhotometricInterpretation, FrameOfReferenceUID or Modality is refused naming
which images differ (grouped by value, the largest group first; files, never the values): the reason used to
count the values only, and an administrator could not tell which two of 8 slices to look at."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.config import load_config
from node.errors import VolumeError
from node.process import process_series
from node.series import load_volumes
from tests.support.series import edited_phantom

OTHER_FOR = generate_uid()


@pytest.mark.parametrize(("keyword", "value"), [
    ("PhotometricInterpretation", "MONOCHROME1"),
    ("FrameOfReferenceUID", OTHER_FOR),
    ("Modality", "MR"),
])
def test_images_that_differ_are_named(tmp_path: Path, keyword: str, value: str) -> None:
    def change(k: int, ds: Dataset) -> None:
        if k in (3, 6):
            setattr(ds, keyword, value)

    files = edited_phantom(tmp_path, change, slices=8)
    with pytest.raises(VolumeError) as exc:
        load_volumes(files)
    text = str(exc.value)
    assert f"its images have 2 different {keyword} values" in text
    assert "by value: 6 image(s) (CT0001.dcm, CT0002.dcm, CT0003.dcm, CT0005.dcm, CT0006.dcm, ...); " \
           "2 image(s) (CT0004.dcm, CT0007.dcm)" in text
    assert OTHER_FOR not in text and "PHANTOM" not in text
    cfg = load_config(None)
    with pytest.raises(VolumeError, match=r"2 image\(s\) \(CT0004.dcm, CT0007.dcm\)"):
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
