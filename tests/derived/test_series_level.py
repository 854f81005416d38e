"""A source whose slices disagree on a patient, study, series or equipment attribute that is not identity
(PatientAge, StudyDescription, BodyPartExamined, InstitutionName: a scanner that rewrote a header mid-series, or a
series edited slice by slice in a PACS) gave a derived series that disagreed with itself: every derived slice
copied these from its nearest input slice, so a reader saw two study descriptions in one derived series. Now every
derived object carries the value of the input's first slice, and the job's report names the attributes (never their
values)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from node.config import load_config
from node.process import process_series
from tests.support.series import edited_phantom

CHANGED = {"PatientAge": "041Y", "StudyDescription": "QZSTUDY OTHER", "BodyPartExamined": "QZPART",
           "InstitutionName": "QZ OTHER HOSPITAL"}


def _disagreeing(k: int, ds: Dataset) -> None:
    ds.PatientAge = "040Y"
    ds.StudyDescription = "QZSTUDY FIRST"
    ds.BodyPartExamined = "CHEST"
    ds.InstitutionName = "QZ FIRST HOSPITAL"
    if k >= 3:  # the second half of the series: another value of each
        for kw, value in CHANGED.items():
            setattr(ds, kw, value)


def test_a_derived_series_carries_one_value_of_each_series_attribute(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _disagreeing, slices=6)
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    derived = [pydicom.dcmread(p) for p in res.derived_files]
    first = pydicom.dcmread(files[0])
    assert len(derived) > 6
    for kw in CHANGED:
        assert {str(d.get(kw)) for d in derived} == {str(first.get(kw))}, kw
    note = next(n for n in res.report["notes"] if "input instances differ" in n)
    assert all(kw in note for kw in CHANGED), note
    assert "QZ" not in note and "041Y" not in note  # the attributes are named, never their values
    # identity and per-slice values are untouched: one patient, each slice's own acquisition values
    assert {str(d.PatientID) for d in derived} == {str(first.PatientID)}


def test_a_series_that_agrees_has_no_note(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, lambda k, ds: None, slices=4)
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert not [n for n in res.report["notes"] if "input instances differ" in n]
