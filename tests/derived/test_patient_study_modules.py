"""Every Patient / General Study / Patient Study attribute of the input reaches every object srnode writes
(derived slices, the Parametric Map, the uncertainty card, the rejection note), unchanged.

Measured on ../shared/data (bench/conform_sweep.py): the derived objects copied a short list, so the de-identified
GE CT, the XA30 enhanced MR and field map lost PatientIdentityRemoved (YES), the Siemens MPRAGE lost PatientComments and
PhysiciansOfRecord, and the Philips fMRI lost PregnancyStatus (a US value: the VR check read
its bytes as text and dropped it as "not valid for its VR"); the rejection note copied fewer still (no
IssuerOfPatientID). The de-identified CT says PatientIdentityRemoved YES without a method: copied alone, that is a
dciodvfy error (DeidentificationMethod is Type 1C), so the derived objects say the method was not stated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.config import UncertaintyObject, load_config, replace
from node.derived.iocm import rejection_note
from node.derived.modules import DEIDENTIFICATION_UNSTATED
from node.process import process_series
from tests.support.engines import SIGMA_TEST_ENGINE, sigma_engines
from tests.support.peers import dciodvfy
from tests.support.series import edited_phantom

TEXT = {"IssuerOfPatientID": "QZ ISSUER", "PatientComments": "QZ COMMENT", "PatientIdentityRemoved": "YES",
        "PhysiciansOfRecord": "QZ^RECORD", "ConsultingPhysicianName": "QZ^CONSULT", "AdditionalPatientHistory": "QZ HIST",
        "AccessionNumber": "QZACC1"}


def _hospital_header(k: int, ds: Dataset) -> None:
    for kw, value in TEXT.items():
        setattr(ds, kw, value)
    ds.DeidentificationMethod = ""  # as the de-identified GE CT of ../shared/data: YES, no method
    ds.PregnancyStatus = 4  # US: unknown
    other = Dataset()
    other.PatientID = "QZOTHER"
    other.IssuerOfPatientID = "QZ OTHER ISSUER"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])


def _carries_the_patient_and_study(ds: Dataset, what: str) -> None:
    for kw, value in TEXT.items():
        assert str(ds.get(kw)) == value, f"{what}: {kw} lost or changed"
    assert ds.get("PregnancyStatus") == 4, f"{what}: PregnancyStatus lost"
    assert ds.DeidentificationMethod == DEIDENTIFICATION_UNSTATED, what
    assert [str(i.PatientID) for i in ds.OtherPatientIDsSequence] == ["QZOTHER"], what


def test_every_object_carries_the_inputs_patient_and_study_modules(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _hospital_header, slices=5)
    cfg = load_config(None)
    cfg = replace(cfg, derive=dataclasses.replace(cfg.derive, uncertainty=UncertaintyObject.BOTH))
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    assert not [n for n in res.report["notes"] if "not valid for their VR" in n], res.report["notes"]
    written = [*res.derived_files, *res.uncertainty_files]
    assert len(res.derived_files) == 9 and len(res.uncertainty_files) == 2
    for p in written:
        _carries_the_patient_and_study(pydicom.dcmread(p, stop_before_pixels=True), p.name)
    for p in (res.derived_files[0], *res.uncertainty_files):
        errors, warnings = dciodvfy(p)
        assert not errors, f"{p.name}: {errors}"
        # only the modules' own attributes: none makes the object a Standard Extended SOP Class
        assert not [w for w in warnings if "not present in standard DICOM IOD" in w], f"{p.name}: {warnings}"
    note = rejection_note(written, cfg.derive, tmp_path / "ko", "superseded")
    _carries_the_patient_and_study(pydicom.dcmread(note), "rejection note")
    errors, _ = dciodvfy(note)
    assert not errors, errors
