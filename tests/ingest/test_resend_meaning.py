"""A resend of a stored SOPInstanceUID with the same pixels but another place or meaning (ImagePositionPatient,
rescale, orientation, functional groups) is a conflict kept aside, not a plain duplicate (break13f: it was dropped
as "the same instance", so which geometry a job used depended on which copy came first, without a word)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from node.app.phantom import write_phantom_series
from node.ingest.resend import resend_difference
from node.store import Instance


def _kept(path: Path) -> Instance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                    str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), str(path), "CT01", "")


@pytest.mark.parametrize(("keyword", "value", "same"), [
    ("ImagePositionPatient", ["0", "0", "7.5"], False),
    ("RescaleIntercept", "-1000", False),
    ("RescaleSlope", "2", False),
    ("PixelSpacing", ["0.5", "0.5"], False),
    ("RescaleIntercept", "-1024.0", True),  # the same number written otherwise
    ("InstanceNumber", "99", True),  # not what the image means
])
def test_a_resend_with_the_same_pixels_but_another_meaning_is_a_conflict(tmp_path: Path, keyword: str,
                                                                          value: object, same: bool) -> None:
    files = write_phantom_series(tmp_path / "in", slices=3, size=16, step_mm=3.0)
    ds = pydicom.dcmread(files[1])
    setattr(ds, keyword, value)
    resend = tmp_path / "resend.dcm"
    ds.save_as(resend, enforce_file_format=True)
    kept = _kept(files[1])
    why = resend_difference(kept, kept.study_uid, kept.series_uid, resend)
    assert why == ("" if same else f"{keyword} differs"), why
    assert "-1000" not in why and "7.5" not in why  # attributes are named, never their values
