"""Checks on a loaded input series before anything is derived from it (the node's jobs and ``srnode process``).

- :func:`check_one_patient`: every instance belongs to one patient and one study. Instances that differ in
  PatientID, IssuerOfPatientID, PatientName, PatientBirthDate (as present) or StudyInstanceUID are never stacked
  into one derived series: the series is refused, the reason naming the attributes that differ, never their values.
- :func:`conform_copied`: a value the derived objects would merely copy (patient, study, series, equipment and
  acquisition attributes) that is not valid for its VR -- ``PatientBirthDate = 1901-02-03`` -- must not fail the
  job: it is dropped (left empty where the attribute is type 2) and the attribute's name, never its value, is noted.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM, validate_value

from node.derived.modules import (
    _TYPE2,
    ACQUISITION,
    CT_IMAGE,
    EQUIPMENT,
    MR_IMAGE,
    PATIENT,
    SERIES,
    STUDY,
)
from node.errors import VolumeError
from node.phi import IDENTITY_KEYWORDS, raw_text
from node.series import SeriesVolume

_RAISE = 2  # pydicom.config.RAISE
COPIED = tuple(dict.fromkeys((*PATIENT, *STUDY, *SERIES, *EQUIPMENT, *ACQUISITION, *CT_IMAGE, *MR_IMAGE)))
_NOT_CHECKED = frozenset({"StudyInstanceUID"})  # checked (and required) elsewhere


def _identity(ds: Dataset, kw: str) -> str:
    text = raw_text(ds, kw)
    return text.rstrip("^ ") if kw == "PatientName" else text


def check_one_patient(series_uid: str, datasets: Sequence[Dataset]) -> None:
    """VolumeError when the series' instances (``datasets``, every volume of the series together) belong to more
    than one patient or study; the reason names the attributes, never their values."""
    unique = list({id(ds): ds for ds in datasets}.values())
    if len(unique) < 2:
        return
    differ: list[str] = []
    for kw in (*IDENTITY_KEYWORDS, "StudyInstanceUID"):
        values = {_identity(ds, kw) for ds in unique}
        if len(values) > 1:
            differ.append(f"{kw}: {len(values)} different values")
    if not differ:
        return
    patients = len({tuple(_identity(ds, kw) for kw in IDENTITY_KEYWORDS) for ds in unique})
    studies = len({_identity(ds, "StudyInstanceUID") for ds in unique})
    raise VolumeError(f"series {series_uid}: its {len(unique)} instances belong to {patients} patient(s) in "
                      f"{studies} study(ies) ({'; '.join(differ)}); instances of different patients or studies are "
                      "never stacked into one derived series")


def _valid(vr: str, text: str) -> bool:
    for v in text.split("\\") if vr not in ("LT", "ST", "UT") else [text]:
        try:
            validate_value(vr, v, _RAISE)
            if v and vr == "DA":
                DA(v)
            elif v and vr == "TM":
                TM(v)
        except (ValueError, TypeError, OverflowError):
            return False
    return True


def conform_dataset(ds: Dataset) -> dict[str, str]:
    """Drop the copied attributes of ``ds`` whose values are not valid for their VR (in memory; a type 2 one is
    left empty); returns {keyword: VR} of those dropped. Also applied to an input header read again from its file
    (``node.series.InputHeaders.release``), so it carries what the checked header carried."""
    bad: dict[str, str] = {}
    for kw in COPIED:
        tag = tag_for_keyword(kw)
        if kw in _NOT_CHECKED or tag is None or tag not in ds:
            continue
        try:
            vr = str(ds.get_item(tag).VR or dictionary_VR(tag))
        except Exception:  # noqa: BLE001 - an element that cannot even be read: drop it
            vr = dictionary_VR(tag)
            ok = False
        else:
            ok = vr in ("SQ", "UN", "OB", "OW") or _valid(vr, raw_text(ds, kw))
        if ok:
            continue
        bad[kw] = vr
        del ds[tag]  # the raw element goes without being converted (pydicom would warn with its value)
        if kw in _TYPE2:
            ds.add_new(tag, vr, None if vr in ("IS", "DS") else "")
    return bad


def conform_copied(vol: SeriesVolume) -> list[str]:
    """Drop the copied attributes whose values are not valid for their VR from the series' datasets (in memory,
    ``conform_dataset``); returns one note naming them (empty list when every value conforms)."""
    bad: dict[str, str] = {}
    for ds in {id(d): d for d in vol.datasets}.values():
        bad.update(conform_dataset(ds))
    if not bad:
        return []
    names = ", ".join(f"{kw} ({vr})" for kw, vr in bad.items())
    return [f"values not valid for their VR were not copied into the derived objects: {names}"]


def check_inputs(vols: Sequence[SeriesVolume]) -> None:
    """Both checks on the volumes of one series, in order: one patient and study across all of them (VolumeError;
    a series split into volumes is checked as a whole), then each volume's copied values (noted in its
    ``notes``, which the job's report carries)."""
    if not vols:
        return
    check_one_patient(vols[0].series_uid, [ds for v in vols for ds in v.datasets])
    for vol in vols:
        vol.notes.extend(conform_copied(vol))
