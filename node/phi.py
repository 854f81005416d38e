"""Patient data kept out of every output channel: logs, the audit log, job reasons, ``srnode status``, HTTP answers.

The node names series by UIDs and says why in words; it never writes a value of a patient or study attribute
anywhere but into the DICOM objects it sends. Two tools enforce that where text comes from elsewhere (pydicom's
and highdicom's warnings and exception messages):

- :func:`series_values` / :func:`scrub`: the values a series actually carries, and a text with each of them
  (whole, per component, dates also written with dashes) replaced by ``***`` -- used where an exception's text
  becomes a job's reason;
- :func:`mask_quoted`: every quoted value in a text replaced by ``'***'`` -- used on third-party log records and
  on the message lines of logged tracebacks (``node.app.logs``), where the values are not known.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from node.dicom_read import read_dicom

# the patient, study and encounter attributes whose values never leave the node but in the objects it sends
PHI_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAge", "PatientSize", "PatientWeight",
    "PatientAddress", "PatientTelephoneNumbers", "PatientComments", "EthnicGroup", "MilitaryRank",
    "MedicalRecordLocator", "AdmissionID", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
    "StudyDescription", "ReferringPhysicianName", "ReferringPhysicianAddress", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "PerformingPhysicianName", "OperatorsName", "RequestingPhysician",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "ContentDate",
    "ContentTime", "PerformedProcedureStepStartDate", "PerformedProcedureStepID", "RequestedProcedureID",
    "ScheduledProcedureStepID",
)
# the attributes that say whose images these are: instances differing in one are never stacked together
IDENTITY_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")

MASK = "***"
MIN_FORM = 3  # shorter values ("M", "42") are not searched for: they would blank ordinary words and numbers
_TAGS = tuple(t for t in (tag_for_keyword(k) for k in PHI_KEYWORDS) if t is not None)
_QUOTED = re.compile(r"""(?P<q>['"])(?:(?!(?P=q)).){1,256}(?P=q)""")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def raw_text(ds: Dataset, keyword: str) -> str:
    """The element's value as text, without pydicom's conversion (so without its warnings); "" when absent."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    try:
        elem = ds.get_item(tag)
    except Exception:  # noqa: BLE001 - a broken element has no value worth comparing
        return ""
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8").strip(" \x00")
        except UnicodeDecodeError:
            return value.decode("latin-1").strip(" \x00")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip(" \x00")


_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_PN_DELIMS = {0x5E, 0x3D, 0x5C}  # ^ = \\ : each component group and value starts in the initial repertoire
_TEXT_DELIMS = {0x0D, 0x0A, 0x09, 0x0C, 0x5C}


def decoded_text(ds: Dataset, keyword: str) -> str:
    """The element's value as the text it means: its bytes decoded with the data set's SpecificCharacterSet
    (PS3.5 6.1; ISO 2022 escapes included), without pydicom's conversion of the element (so without its
    warnings). One name written in two repertoires (ISO_IR 126 bytes on some slices, UTF-8 on others) is one
    text; two names with the same bytes in two repertoires (C3 BC is "Ã¼" in ISO_IR 100, "ü" in ISO_IR 192) are
    two. With no SpecificCharacterSet (or only the default repertoire), ``raw_text``'s reading (UTF-8, else
    Latin-1). "" when absent."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    try:
        elem = ds.get_item(tag)
    except Exception:  # noqa: BLE001 - a broken element has no value worth comparing
        return ""
    if elem is None or not isinstance(elem.value, bytes):
        return raw_text(ds, keyword)  # absent, or already converted to text by pydicom
    charsets = [c.strip() for c in raw_text(ds, "SpecificCharacterSet").split("\\")]
    if all(c in _DEFAULT_REPERTOIRE for c in charsets):
        return raw_text(ds, keyword)
    from pydicom.charset import convert_encodings, decode_bytes  # noqa: PLC0415 - only for a stated repertoire

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unknown repertoire or an undecodable byte: replaced, not quoted
            encodings = convert_encodings(charsets)
            vr = str(getattr(elem, "VR", "") or dictionary_vr_of(tag))
            text = decode_bytes(elem.value, encodings, _PN_DELIMS if vr == "PN" else _TEXT_DELIMS)
    except Exception:  # noqa: BLE001 - a repertoire that cannot be applied: the bytes as raw_text reads them
        return raw_text(ds, keyword)
    return text.strip(" \x00")


def dictionary_vr_of(tag: int) -> str:
    """The data dictionary's VR of ``tag`` ("" when it has none)."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def forms(value: str) -> set[str]:
    """Every way ``value`` may show up in a message: whole, each value of a multi-value, each name component,
    a DA written with dashes or slashes; only forms of ``MIN_FORM`` characters or more (words of a multi-word
    value are not searched alone: "GENERAL" would blank ordinary text)."""
    out: set[str] = set()
    for v in {value, *value.split("\\")}:
        v = v.strip()
        parts = {v, *re.split(r"[\^=]", v)} if ("^" in v or "=" in v) else {v}
        for p in parts:
            p = p.strip()
            out.add(p)
            m = _DATE.match(p)
            if m:
                out |= {f"{m[1]}-{m[2]}-{m[3]}", f"{m[1]}/{m[2]}/{m[3]}", f"{m[3]}.{m[2]}.{m[1]}"}
    return {f for f in out if len(f) >= MIN_FORM}


def dataset_values(ds: Dataset) -> set[str]:
    """The forms of every patient/study value ``ds`` carries."""
    out: set[str] = set()
    for kw in PHI_KEYWORDS:
        for text in {raw_text(ds, kw), decoded_text(ds, kw)}:  # the bytes' reading and the text they mean
            if text:
                out |= forms(text)
    return out


def series_values(paths: Iterable[Path | str]) -> set[str]:
    """The forms of every patient/study value in the files (headers only; unreadable files are skipped)."""
    out: set[str] = set()
    for p in paths:
        try:
            ds = read_dicom(p, stop_before_pixels=True, specific_tags=list(_TAGS))
        except Exception:  # noqa: BLE001 - a file that cannot be read carries nothing we could quote
            continue
        out |= dataset_values(ds)
    return out


def scrub(text: str, values: Iterable[str]) -> str:
    """``text`` with every standalone occurrence of one of ``values`` (case-insensitive) replaced by ``***``.

    Standalone: not inside a longer word or a UID (a date inside ``1.3.12.2.20130308...`` is left alone).
    """
    for v in sorted((v for v in set(values) if len(v) >= MIN_FORM), key=len, reverse=True):
        text = re.sub(rf"(?<![\w.]){re.escape(v)}(?![\w.])", MASK, text, flags=re.IGNORECASE)
    return text


def mask_quoted(text: str) -> str:
    """Every quoted value in ``text`` replaced by ``'***'`` (for messages whose values are not known)."""
    return _QUOTED.sub(lambda m: f"{m['q']}{MASK}{m['q']}", text)


def mask_traceback(text: str) -> str:
    """A formatted traceback with the quoted values of its message lines masked (code lines are indented)."""
    return "\n".join(ln if ln[:1].isspace() else mask_quoted(ln) for ln in text.split("\n"))
