"""Checks on a loaded input series before anything is derived from it (the node's jobs and ``srnode process``).

- :func:`check_one_patient`: every instance belongs to one patient and one study. Instances that differ in
  PatientID, IssuerOfPatientID, PatientName, PatientBirthDate (as present) or StudyInstanceUID are never stacked
  into one derived series: the series is refused, the reason naming the attributes that differ, never their values.
- :func:`conform_copied`: a value the derived objects would merely copy (patient, study, series, equipment and
  acquisition attributes) that is not valid for its VR -- ``PatientBirthDate = 1901-02-03`` -- must not fail the
  job: it is dropped (left empty where the attribute is type 2) and the attribute's name, never its value, is noted.
- :func:`differing_series_values`: the patient, study, series, frame of reference and equipment attributes that
  are not identity but still one value per series in the derived objects (PatientAge, StudyDescription,
  BodyPartExamined, ...): where the input instances disagree, the derived objects carry the value of the
  input's first slice (``node.derived.image_series``) and the job's report names the attributes, never their values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM, validate_value

from node.derived.modules import (
    _TYPE2,
    ACQUISITION,
    CT_IMAGE,
    EQUIPMENT,
    FRAME_OF_REFERENCE,
    MR_IMAGE,
    PATIENT,
    SERIES,
    STUDY,
)
from node.errors import VolumeError
from node.phi import IDENTITY_KEYWORDS, decoded_text, raw_text
from node.series import SeriesVolume

_RAISE = 2  # pydicom.config.RAISE
COPIED = tuple(dict.fromkeys((*PATIENT, *STUDY, *SERIES, *EQUIPMENT, *ACQUISITION, *CT_IMAGE, *MR_IMAGE)))
_NOT_CHECKED = frozenset({"StudyInstanceUID"})  # checked (and required) elsewhere


def _identity(ds: Dataset, kw: str) -> str:
    """``kw``'s value as compared: the text it means in the data set's character set (``decoded_text``: one name
    written in two repertoires is one patient, two names with the same bytes are two), a PatientName without
    trailing empty components."""
    text = decoded_text(ds, kw)
    return text.rstrip("^ ") if kw == "PatientName" else text


_IDENTITY = (*IDENTITY_KEYWORDS, "StudyInstanceUID")
# one value per derived series (the first input instance's), compared across the input (``differing_series_values``)
SERIES_LEVEL = tuple(kw for kw in dict.fromkeys((*PATIENT, *STUDY, *SERIES, *FRAME_OF_REFERENCE, *EQUIPMENT))
                     if kw not in _IDENTITY)


@dataclass(frozen=True)
class InputCheck:
    """What the checks take of one input header as it is read (``inspect_input``), so that the load need not hold
    it: ``identity`` its ``IDENTITY_KEYWORDS`` and StudyInstanceUID values (as compared by ``check_one_patient``),
    ``dropped`` {keyword: VR} of the copied attributes ``conform_dataset`` drops from it, ``series_level`` its
    ``SERIES_LEVEL`` values as copied (after ``conform_dataset``)."""

    identity: tuple[str, ...]
    dropped: dict[str, str]
    series_level: tuple[str, ...] = ()


def inspect_input(ds: Dataset) -> InputCheck:
    """Take the checks' values of the input header ``ds`` (its identity, then ``conform_dataset``: ``ds`` is
    changed). Given to ``node.series.load_volumes`` as ``inspect``, kept in each slice's record (``seen``)."""
    identity = tuple(_identity(ds, kw) for kw in _IDENTITY)
    dropped = conform_dataset(ds)
    return InputCheck(identity, dropped, _series_level(ds))


def _series_level(ds: Dataset) -> tuple[str, ...]:
    return tuple(decoded_text(ds, kw) for kw in SERIES_LEVEL)


def differing_series_values(inputs: Sequence[Dataset | InputCheck]) -> list[str]:
    """The ``SERIES_LEVEL`` keywords on which the input instances (headers, conformed, or what ``inspect_input``
    took of them) disagree, in ``SERIES_LEVEL`` order; [] when they agree."""
    rows = {x.series_level if isinstance(x, InputCheck) else _series_level(x) for x in inputs}
    if len(rows) < 2:
        return []
    return [kw for i, kw in enumerate(SERIES_LEVEL) if len({row[i] for row in rows}) > 1]


def check_one_patient(series_uid: str, datasets: Sequence[Dataset | InputCheck]) -> None:
    """VolumeError when the series' instances (``datasets``, every volume of the series together: headers, or
    what ``inspect_input`` took of them) belong to more than one patient or study; the reason names the
    attributes, never their values."""
    unique = [x.identity if isinstance(x, InputCheck) else tuple(_identity(x, kw) for kw in _IDENTITY)
              for x in {id(ds): ds for ds in datasets}.values()]
    if len(unique) < 2:
        return
    differ: list[str] = []
    for i, kw in enumerate(_IDENTITY):
        values = {ident[i] for ident in unique}
        if len(values) > 1:
            differ.append(f"{kw}: {len(values)} different values")
    if not differ:
        return
    n = len(IDENTITY_KEYWORDS)
    patients = len({ident[:n] for ident in unique})
    studies = len({ident[n] for ident in unique})
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


# binary number VRs: their value is not text (``raw_text`` gave its bytes, which ``_valid`` refused, so a valid
# PregnancyStatus (US) was dropped); valid when pydicom can read the value
_BINARY = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OF", "OD", "OL", "OV"})


def _binary_ok(ds: Dataset, tag: int) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds[tag].value  # noqa: B018 - the conversion is the check
    except Exception:  # noqa: BLE001 - pydicom raises many types on a value of the wrong length
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
            ok = vr in ("SQ", "UN", "OB", "OW") or (_binary_ok(ds, tag) if vr in _BINARY else
                                                       _valid(vr, raw_text(ds, kw)))
        if ok:
            continue
        bad[kw] = vr
        del ds[tag]  # the raw element goes without being converted (pydicom would warn with its value)
        if kw in _TYPE2:
            ds.add_new(tag, vr, None if vr in ("IS", "DS") else "")
    return bad


def _inputs(vol: SeriesVolume) -> list[Dataset | InputCheck]:
    """Each input instance of ``vol`` once, slice order: its held header, or what ``inspect_input`` took of it as
    it was loaded (its header read again and inspected when the load was not asked to: ``load_volumes``)."""
    out: dict[int, Dataset | InputCheck] = {}
    heads = vol.datasets
    for k in range(len(heads)):
        ds = heads.held_dataset(k)
        if ds is not None:
            out.setdefault(id(ds), ds)
            continue
        seen = heads.record(k).seen
        check = seen if isinstance(seen, InputCheck) else inspect_input(heads[k])
        out[id(check)] = check
    return list(out.values())


def conform_copied(vol: SeriesVolume, inputs: Sequence[Dataset | InputCheck] | None = None) -> list[str]:
    """Drop the copied attributes whose values are not valid for their VR from the series' held headers (in
    memory, ``conform_dataset``; a header not held was conformed as it was loaded, and is again when read again:
    ``InputHeaders.release``); returns one note naming them all (empty list when every value conforms).
    ``inputs``: ``vol``'s instances as ``_inputs`` gives them (made here when not given)."""
    bad: dict[str, str] = {}
    for x in inputs if inputs is not None else _inputs(vol):
        bad.update(x.dropped if isinstance(x, InputCheck) else conform_dataset(x))
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
    inputs = [_inputs(v) for v in vols]
    check_one_patient(vols[0].series_uid, [x for xs in inputs for x in xs])
    for vol, xs in zip(vols, inputs, strict=True):
        vol.notes.extend(conform_copied(vol, xs))
        differ = differing_series_values(xs)
        if differ:
            vol.notes.append(f"the input instances differ in {', '.join(differ)}: every derived object carries the "
                             "value of the input's first slice")
