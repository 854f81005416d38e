"""A CT or MR image whose Modality contradicts its SOP class (CT Image Storage with Modality MR or PT, MR Image
Storage with Modality CT: a converter's or a re-labelling tool's slip) is refused before the engine runs, the reason
naming both. Before, the derived series copied the contradiction: a CT Image Storage object saying Modality MR (its
values then not treated as Hounsfield units), or an MR image without its MR attributes, which dciodvfy flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from node.config import load_config
from node.errors import DeriveError
from node.process import process_series
from tests.support.series import edited_phantom


def _modality(value: str, mr_class: bool = False):  # type: ignore[no-untyped-def]
    def change(k: int, ds: Dataset) -> None:
        ds.Modality = value
        if mr_class:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    return change


@pytest.mark.parametrize(("value", "mr_class", "stated"), [("MR", False, "CT"), ("PT", False, "CT"),
                                                            ("CT", True, "MR")])
def test_a_sop_class_and_modality_that_contradict_are_refused(tmp_path: Path, value: str, mr_class: bool,
                                                             stated: str) -> None:
    files = edited_phantom(tmp_path, _modality(value, mr_class), slices=4)
    cfg = load_config(None)
    with pytest.raises(DeriveError) as err:
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert f"SOP class is {stated} Image Storage" in str(err.value) and f"Modality is '{value}'" in str(err.value)
    assert not list((tmp_path / "out").rglob("*.dcm"))  # nothing derived
