"""Patient identity is compared as the text the bytes mean in each instance's SpecificCharacterSet, not as bytes:
one Greek name written in ISO_IR 126 on four slices and in UTF-8 on four was refused as two patients; two names
with the same bytes in two repertoires (C3 BC: "Ã¼" in ISO_IR 100, "ü" in ISO_IR 192; C4: "Ä" in ISO_IR 100, "Ф" in
ISO_IR 144) were stacked into one derived series. The log masking covers the decoded name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.config import load_config
from node.errors import VolumeError
from node.ingest.resend import resend_difference
from node.phi import dataset_values, scrub
from node.process import process_series
from node.series import load_volumes
from node.store import Instance
from tests.support.peers import dciodvfy
from tests.support.series import edited_phantom

GREEK = "Διονυσιος^Γιαννης"


def _named(first: tuple[str, str], second: tuple[str, str], description: str = "") -> Callable[[int, Dataset], None]:
    def change(k: int, ds: Dataset) -> None:
        ds.SpecificCharacterSet, ds.PatientName = first if k < 4 else second
        if description and k >= 4:
            ds.StudyDescription = description
    return change


def test_one_name_in_two_repertoires_is_one_patient(tmp_path: Path) -> None:
    # the second half also carries another study description, one the first half's repertoire cannot hold
    files = edited_phantom(tmp_path, _named(("ISO_IR 126", GREEK), ("ISO_IR 192", GREEK), "Ж"), slices=8)
    a, b = (pydicom.dcmread(f) for f in (files[0], files[7]))
    assert a.get_item("PatientName").value != b.get_item("PatientName").value  # other bytes (pydicom has not decoded them)
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    derived = [pydicom.dcmread(p) for p in res.derived_files]
    assert {str(d.PatientName) for d in derived} == {GREEK}
    # one StudyDescription for the derived series, the first slice's (node.derived.image_series), the difference noted
    assert {str(d.StudyDescription) for d in derived} == {str(a.StudyDescription)}
    assert any("differ in" in n and "StudyDescription" in n for n in res.report["notes"])
    assert "Ж" not in " ".join(res.report["notes"])
    for f in (res.derived_files[0], res.derived_files[-1]):  # ISO_IR 126, then UTF-8
        errors, _ = dciodvfy(f)
        assert not errors, errors


@pytest.mark.parametrize(("first", "second"), [
    (("ISO_IR 100", "MÃ¼LLER^ANNA"), ("ISO_IR 192", "MüLLER^ANNA")),  # bytes 4D C3 BC 4C ... in both
    (("ISO_IR 100", "ÄNNA^X"), ("ISO_IR 144", "ФNNA^X")),  # byte C4 in both
])
def test_two_names_with_the_same_bytes_are_two_patients(tmp_path: Path, first: tuple[str, str],
                                                        second: tuple[str, str]) -> None:
    files = edited_phantom(tmp_path, _named(first, second), slices=8)
    a, b = (pydicom.dcmread(f) for f in (files[0], files[7]))
    assert a.get_item("PatientName").value == b.get_item("PatientName").value  # the same bytes (pydicom has not decoded them)
    vols = load_volumes(files)
    cfg = load_config(None)
    with pytest.raises(VolumeError, match=r"belong to 2 patient\(s\) in 1 study\(ies\) \(PatientName: 2 different"):
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert vols  # the load itself is not about patients


def test_masking_covers_the_decoded_name(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _named(("ISO_IR 126", GREEK), ("ISO_IR 126", GREEK)), slices=2)
    values = dataset_values(pydicom.dcmread(files[0], stop_before_pixels=True))
    text = scrub("pydicom: cannot encode 'Διονυσιος^Γιαννης' (Διονυσιος)", values)
    assert "Διονυσιος" not in text and "Γιαννης" not in text


@pytest.mark.parametrize(("resent", "same"), [
    (("ISO_IR 192", GREEK), True),  # the name re-encoded in UTF-8 (a PACS's export): the same instance
    (("ISO_IR 100", "MÃ¼LLER^ANNA"), False),  # another name, though its bytes equal the kept UTF-8 one's
])
def test_a_resend_compares_the_name_it_means(tmp_path: Path, resent: tuple[str, str], same: bool) -> None:
    """The ingest's check of a resent SOPInstanceUID (``node.ingest.resend``) compares identities as text too."""
    kept_as = ("ISO_IR 126", GREEK) if same else ("ISO_IR 192", "MüLLER^ANNA")
    (kept_file,) = edited_phantom(tmp_path, _named(kept_as, kept_as), slices=1)
    ds = pydicom.dcmread(kept_file)
    ds.SpecificCharacterSet, ds.PatientName = resent
    resend = tmp_path / "resend.dcm"
    ds.save_as(resend)
    head = pydicom.dcmread(kept_file, stop_before_pixels=True)
    kept = Instance(str(head.SOPInstanceUID), str(head.SeriesInstanceUID), str(head.StudyInstanceUID),
                    str(head.SOPClassUID), str(head.file_meta.TransferSyntaxUID), str(kept_file), "CT01", "")
    why = resend_difference(kept, kept.study_uid, kept.series_uid, resend)
    assert why == ("" if same else "PatientName differs"), why
