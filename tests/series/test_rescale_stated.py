"""A rescale stated on some images of a series and absent on others is refused, naming the images: the absent one
was taken as slope 1 / intercept 0, so a CT with RescaleIntercept -1024 on six of eight slices was derived with two
slices 1024 HU off, exit 0, valid to every check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.config import load_config
from node.errors import VolumeError
from node.process import process_series
from node.series import load_volumes
from tests.support.series import edited_phantom


def _both_absent(k: int, ds: Dataset) -> None:
    if k in (2, 5):
        del ds.RescaleIntercept
        del ds.RescaleSlope


def _intercept_absent(k: int, ds: Dataset) -> None:
    if k == 2:
        del ds.RescaleIntercept


def _intercept_empty(k: int, ds: Dataset) -> None:
    if k == 7:
        ds.RescaleIntercept = None


@pytest.mark.parametrize(("change", "keyword", "named"), [
    (_both_absent, "RescaleSlope", ["CT0003.dcm", "CT0006.dcm"]),
    (_intercept_absent, "RescaleIntercept", ["CT0003.dcm"]),
    (_intercept_empty, "RescaleIntercept", ["CT0008.dcm"]),
])
def test_a_rescale_stated_on_some_images_only_is_refused_naming_them(
        tmp_path: Path, change: Callable[[int, Dataset], None], keyword: str, named: list[str]) -> None:
    files = edited_phantom(tmp_path, change, slices=8)
    with pytest.raises(VolumeError) as exc:
        load_volumes(files)
    text = str(exc.value)
    assert f"{keyword} is stated on {8 - len(named)} of its 8 images and absent on {len(named)}" in text
    for name in named:
        assert name in text
    assert "PHANTOM" not in text  # the file names, never a patient value
    cfg = load_config(None)
    with pytest.raises(VolumeError, match=keyword):
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")


def test_a_rescale_absent_on_every_image_is_still_the_identity(tmp_path: Path) -> None:
    """Absent on all images (an MR): nothing to disagree with, stored values are the modality values."""
    def drop(k: int, ds: Dataset) -> None:
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
            del ds[kw]

    files = edited_phantom(tmp_path, drop, slices=8)
    (vol,) = load_volumes(files)
    assert vol.rescale_slope == 1.0 and vol.rescale_intercept == 0.0
    assert float(vol.data.min()) >= 0.0  # stored 0..4095, not shifted by the CT's -1024
