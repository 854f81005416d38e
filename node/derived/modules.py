"""Building blocks of the derived objects: deterministic UIDs, copied module attributes, code items, references,
Contributing Equipment and file meta (shared by ``node.derived.image_series`` and ``node.derived.uncertainty``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from collections.abc import Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from models.engine import Factors
from node import PIPELINE_VERSION, __version__
from node.config import DeriveConfig
from node.series import SeriesVolume, group_value, sop_class_of, sop_instance_of

PARAMETRIC_MAP_STORAGE = UID("1.2.840.10008.5.1.4.1.1.30")  # PS3.4 B.5: the uncertainty map
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")  # the uncertainty card

# attributes copied from the nearest input slice, per module (a whitelist; never private tags)
# Patient (PS3.3 C.7.1.1) and Patient Study (C.7.2.2) attributes: every one of the modules' that a derived object
# can carry as the source has it (a short list lost PatientIdentityRemoved / DeidentificationMethod of de-identified
# input, PatientComments, OtherPatientIDsSequence, PregnancyStatus ...: a derived object must say of its patient
# what the source says). Only the modules' own attributes: RequestingService (Imaging Service Request) or the retired
# OtherPatientIDs copied would make every object a Standard Extended SOP Class (dciodvfy warns))
PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
           "PatientSize", "PatientWeight", "EthnicGroup",
           "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID", "PatientBirthTime",
           "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
           "PatientAlternativeCalendar", "QualityControlSubject", "OtherPatientNames",
           "OtherPatientIDsSequence", "EthnicGroupCodeSequence", "PatientSpeciesDescription",
           "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
           "BreedRegistrationSequence", "StrainDescription", "StrainNomenclature", "StrainCodeSequence",
           "StrainAdditionalInformation", "StrainStockSequence", "GeneticModificationsSequence",
           "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization", "PatientComments",
           "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
           "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
           "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
           "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "AdmittingDiagnosesDescription",
           "AdmittingDiagnosesCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
           "ServiceEpisodeID", "IssuerOfServiceEpisodeIDSequence", "ServiceEpisodeDescription", "ReasonForVisit",
           "ReasonForVisitCodeSequence")
# General Study (PS3.3 C.7.2.1)
STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
         "StudyDescription",
         "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
         "ConsultingPhysicianIdentificationSequence", "IssuerOfAccessionNumberSequence", "PhysiciansOfRecord",
         "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
         "PhysiciansReadingStudyIdentificationSequence", "RequestingServiceCodeSequence",
         "ReferencedStudySequence", "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence")
SERIES = ("Modality", "BodyPartExamined", "PatientPosition", "Laterality", "ProtocolName")
FRAME_OF_REFERENCE = ("FrameOfReferenceUID", "PositionReferenceIndicator")
EQUIPMENT = ("Manufacturer", "InstitutionName", "StationName", "ManufacturerModelName", "DeviceSerialNumber")
ACQUISITION = ("AcquisitionDate", "AcquisitionTime")
CT_IMAGE = ("KVP", "AcquisitionNumber", "ScanOptions", "DataCollectionDiameter", "ReconstructionDiameter",
            "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight",
            "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType", "GeneratorPower",
            "FocalSpots", "ConvolutionKernel")
MR_IMAGE = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
            "EchoTime", "EchoTrainLength", "InversionTime", "SequenceName", "NumberOfAverages",
            "ImagingFrequency", "ImagedNucleus", "MagneticFieldStrength", "NumberOfPhaseEncodingSteps",
            "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth", "ReceiveCoilName",
            "TransmitCoilName", "InPlanePhaseEncodingDirection", "FlipAngle", "AcquisitionNumber")
_TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator", "Manufacturer",
          "KVP", "AcquisitionNumber", "ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"}


def ds_str(x: float) -> str:
    """``x`` as a Decimal String value of at most 16 characters (DS, PS3.5 6.2); ValueError for NaN / inf."""
    return str(format_number_as_ds(float(x)))


# the [derive] settings that change what every derived object says (SeriesDescription, SeriesNumber); uid_root is
# the UIDs' root itself
_LABEL_SETTINGS = ("series_description_suffix", "series_number_offset", "caution")
_DEFAULT_DERIVE = DeriveConfig()


def settings_token(cfg: DeriveConfig, card: bool = False) -> list[str]:
    """The entropy of the ``[derive]`` settings that change the derived objects' content: [] at the defaults (the
    UIDs of a node left at them are those made before this token existed), else one ``name=value`` per setting
    that differs (a setting changed back to its default gives the default's UIDs again). ``card``: the uncertainty
    card's SeriesNumber also depends on whether a Parametric Map is made beside it (``[derive] uncertainty``)."""
    names = (*_LABEL_SETTINGS, "uncertainty") if card else _LABEL_SETTINGS
    return [f"{n}={json.dumps(getattr(cfg, n))}" for n in names if getattr(cfg, n) != getattr(_DEFAULT_DERIVE, n)]


def derived_uid(cfg: DeriveConfig, vol: SeriesVolume, factors: Factors, engine: str, *what: str,
                card: bool = False) -> str:
    """Deterministic UID under ``cfg.uid_root`` from input series, instances, pipeline, factors, engine, run and
    the ``[derive]`` settings that change what the objects say (:func:`settings_token`; ``card``: the uncertainty
    card's, which also depend on ``[derive] uncertainty``).

    ``what`` tells apart the UIDs of one output ("derived", "sigma", slice index). pydicom's ``generate_uid``
    hashes the entropy sources (SHA-512) into the root's remaining digits (at most 64 characters, PS3.5 9.1).
    A reprocess after a change of caution, suffix, offset or uncertainty kind makes objects with other UIDs: never
    another SeriesDescription or SeriesNumber under UIDs a PACS already holds.
    """
    run = f"run{vol.run[0]}" if vol.run else "all"
    if vol.volume:  # volumes of one enhanced object share their input instances: the volume tells them apart
        run = f"volume{vol.volume[0]}-{run}"
    # the exact set of input instances: a reprocess after late instances makes a new series (it never overwrites
    # slices of the earlier one in PACS); a re-run of the same input gives the same UIDs (a resend is harmless)
    inputs = vol.instances_digest  # computed once per volume (per call it made deriving O(slices²))
    ent = [vol.series_uid, PIPELINE_VERSION, f"tp{factors.through_plane}", f"ip{factors.in_plane}", engine, run,
           inputs, *what, *settings_token(cfg, card)]
    return str(generate_uid(cfg.uid_root, entropy_srcs=ent))


def character_set(src: Dataset) -> str | list[str] | None:
    """The source's SpecificCharacterSet (one value or several, ISO 2022), or None when it has none (the default
    repertoire). Every object the node writes carries it, so person names keep their exact bytes."""
    if "SpecificCharacterSet" not in src:
        return None
    value = src.SpecificCharacterSet
    if value is None or value == "":
        return None
    return [str(v) for v in value] if not isinstance(value, str) and hasattr(value, "__len__") else str(value)


def copy_module(dst: Dataset, src: Dataset, keywords: Sequence[str], from_groups: bool = False) -> None:
    """Copy ``keywords`` present and non-empty in ``src`` (``from_groups``: also from the first frame's or the
    shared functional groups) to ``dst``; an absent Type 2 attribute is written empty (PS3.5 7.4.2)."""
    for kw in keywords:
        value = src.get(kw) if kw in src else (group_value(src, kw) if from_groups else None)
        if isinstance(value, DicomSequence):  # never one Sequence object shared between data sets
            if len(value):
                setattr(dst, kw, copy.deepcopy(value))
        elif value is not None and value != "":
            setattr(dst, kw, value)
        elif kw in _TYPE2:
            setattr(dst, kw, "" if kw != "AcquisitionNumber" else None)


DEIDENTIFICATION_UNSTATED = "not stated in the source images"


def state_deidentification(ds: Dataset) -> None:
    """A Patient module saying PatientIdentityRemoved YES must name the method (DeidentificationMethod or its code
    sequence, Type 1C, PS3.3 C.7.1.1): when the source says YES without one (real de-identified exports do), the
    derived objects keep the YES and say the method was not stated (dciodvfy: "Missing attribute Type 1C")."""
    if str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() != "YES":
        return
    if ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence"):
        return
    ds.DeidentificationMethod = DEIDENTIFICATION_UNSTATED


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A Code Sequence item: CodeValue, CodingSchemeDesignator, CodeMeaning (PS3.3 8.8, Table 8.8-1)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def coding_scheme_item(designator: str, name: str, organization: str) -> Dataset:
    """A Coding Scheme Identification Sequence item declaring a private or local coding scheme used in the object
    (PS3.3 C.12.1.1.4, SOP Common Module; PS3.16 8.2 for "99" private designators)."""
    item = Dataset()
    item.CodingSchemeDesignator = designator
    item.CodingSchemeName = name
    item.CodingSchemeResponsibleOrganization = organization
    return item


DENOISE_NOTE = "self-supervised denoising (blind-spot network trained on this series)"


def contributing_equipment(engine: str, engine_version: str, fallback: str, now: _dt.datetime,
                           denoised: bool = False) -> Dataset:
    """The ContributingEquipmentSequence item naming srnode as Modifying Equipment (DCM 109103), with the
    engine, the fallback and the denoising step, if any (PS3.3 C.12.1 SOP Common Module)."""
    item = Dataset()
    item.Manufacturer = "srnode"
    item.ManufacturerModelName = "srnode"
    item.SoftwareVersions = [f"srnode {__version__}", f"pipeline {PIPELINE_VERSION}", f"{engine} {engine_version}"]
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    desc = f"Super-resolution by srnode {__version__}, engine {engine} {engine_version}"
    if denoised:
        desc = f"{DENOISE_NOTE[0].upper()}{DENOISE_NOTE[1:]}, then s{desc[1:]}"
    if fallback:
        desc += f" (fallback: {fallback})"
    item.ContributionDescription = desc[:1024]
    item.PurposeOfReferenceCodeSequence = DicomSequence([code_item("109103", "DCM", "Modifying Equipment")])
    return item


def source_item(ds: Dataset, frame: int) -> Dataset:
    """A SourceImageSequence item referencing ``ds`` (and ``frame``, 1-based, when > 0) as "Source image for
    image processing operation" (DCM 121322; PS3.3 C.12.4 General Reference Module)."""
    return source_ref(sop_class_of(ds), sop_instance_of(ds), frame)


def source_ref(sop_class_uid: str, sop_instance_uid: str, frame: int) -> Dataset:
    """``source_item`` of the instance with these UIDs (an input slice's ``node.series.SliceHeader``)."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    if frame > 0:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [code_item("121322", "DCM", "Source image for image processing operation")])
    return item


def referenced_series(series_uid: str, instances: Sequence[tuple[str, str]]) -> DicomSequence:
    """ReferencedSeriesSequence of one series listing ``instances`` ((SOP class, SOP instance) pairs, each
    once) (PS3.3 C.12.2 Common Instance Reference Module)."""
    ser = Dataset()
    ser.SeriesInstanceUID = series_uid
    refs = []
    seen: set[str] = set()
    for cls, uid in instances:
        if uid in seen:
            continue
        seen.add(uid)
        it = Dataset()
        it.ReferencedSOPClassUID = cls
        it.ReferencedSOPInstanceUID = uid
        refs.append(it)
    ser.ReferencedInstanceSequence = DicomSequence(refs)
    return DicomSequence([ser])


def add_file_meta(ds: Dataset) -> None:
    """Set ``ds.file_meta`` for writing as Explicit VR Little Endian (PS3.10 7.1); needs SOPClassUID and
    SOPInstanceUID (AttributeError otherwise)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def sigma_file_name(ds: Dataset) -> str:
    """The file name of an uncertainty object in its folder: ``PM00001.dcm`` (Parametric Map) or ``SC00001.dcm``
    (the SC card); one of each at most per derived series."""
    return "PM00001.dcm" if str(ds.SOPClassUID) == PARAMETRIC_MAP_STORAGE else "SC00001.dcm"
