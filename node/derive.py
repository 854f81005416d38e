"""The derived series and its uncertainty Secondary Capture series (pydicom + highdicom).

The derived series sits in the input's study and frame of reference, with new UIDs that are deterministic from
(input SeriesInstanceUID, PIPELINE_VERSION, factors, engine, run) so that reprocessing is recognisable. Patient,
study and acquisition attributes are copied from the nearest input slice (a whitelist per module, never private
tags); geometry is recomputed from the input positions exactly as ``models.engine`` documents it, then checked
again by ``geometry_gate`` before anything leaves.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from models.engine import EngineResult, Factors, output_shape
from node import PIPELINE_VERSION, __version__
from node.config import DeriveConfig
from node.errors import DeriveError
from node.slices import ENHANCED_CT, ENHANCED_MR, group_value
from node.volume import SeriesVolume

log = logging.getLogger(__name__)

GEOMETRY_TOL_MM = 1e-3

_PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
            "PatientSize", "PatientWeight", "EthnicGroup")
_STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
          "StudyDescription")
_SERIES = ("Modality", "BodyPartExamined", "PatientPosition", "Laterality", "ProtocolName")
_FRAME_OF_REFERENCE = ("FrameOfReferenceUID", "PositionReferenceIndicator")
_EQUIPMENT = ("Manufacturer", "InstitutionName", "StationName", "ManufacturerModelName", "DeviceSerialNumber")
_ACQUISITION = ("AcquisitionDate", "AcquisitionTime")
_CT_IMAGE = ("KVP", "AcquisitionNumber", "ScanOptions", "DataCollectionDiameter", "ReconstructionDiameter",
             "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight",
             "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType", "GeneratorPower",
             "FocalSpots", "ConvolutionKernel")
_MR_IMAGE = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
             "EchoTime", "EchoTrainLength", "InversionTime", "SequenceName", "NumberOfAverages",
             "ImagingFrequency", "ImagedNucleus", "MagneticFieldStrength", "NumberOfPhaseEncodingSteps",
             "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth", "ReceiveCoilName",
             "TransmitCoilName", "InPlanePhaseEncodingDirection", "FlipAngle", "AcquisitionNumber")
_TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator", "Manufacturer",
          "KVP", "AcquisitionNumber", "ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"}


@dataclass
class DerivedObjects:
    derived: list[Dataset]
    uncertainty: list[Dataset]
    derived_series_uid: str
    uncertainty_series_uid: str


def ds_str(x: float) -> str:
    return str(format_number_as_ds(float(x)))


def sop_instance_of(ds: Dataset) -> str:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    return uid


def derived_uid(cfg: DeriveConfig, vol: SeriesVolume, factors: Factors, engine: str, *what: str) -> str:
    """Deterministic UID under ``cfg.uid_root`` from the input series and instances, pipeline, factors, engine, run."""
    run = f"run{vol.run[0]}" if vol.run else "all"
    # the exact set of input instances: a reprocess after late instances makes a new series (it never overwrites
    # slices of the earlier one in PACS); a re-run of the same input gives the same UIDs (a resend is harmless)
    inputs = hashlib.sha256("\n".join(sorted({sop_instance_of(d) for d in vol.datasets})).encode()).hexdigest()[:16]
    ent = [vol.series_uid, PIPELINE_VERSION, f"tp{factors.through_plane}", f"ip{factors.in_plane}", engine, run,
           inputs, *what]
    return str(generate_uid(cfg.uid_root, entropy_srcs=ent))


def output_positions(vol: SeriesVolume, factors: Factors) -> np.ndarray:
    """(Z', 3) IPP of every derived slice: on the original slice line, first pixel centre moved in-plane."""
    f, g = factors.through_plane, factors.in_plane
    n = vol.shape[0]
    nz = (n - 1) * f + 1
    out = np.empty((nz, 3))
    for k in range(nz):
        i, r = divmod(k, f)
        if i >= n - 1:
            out[k] = vol.positions[n - 1]
        else:
            t = r / f
            out[k] = vol.positions[i] + t * (vol.positions[i + 1] - vol.positions[i])
    dy, dx = vol.spacing[1], vol.spacing[2]
    shift = (g - 1) / (2 * g) * (dx * vol.row_cosine + dy * vol.col_cosine)
    return out - shift  # type: ignore[no-any-return]


def _copy(dst: Dataset, src: Dataset, keywords: Sequence[str], from_groups: bool = False) -> None:
    for kw in keywords:
        value = src.get(kw) if kw in src else (group_value(src, kw) if from_groups else None)
        if value is not None and value != "":
            setattr(dst, kw, value)
        elif kw in _TYPE2:
            setattr(dst, kw, "" if kw != "AcquisitionNumber" else None)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _output_sop_class(vol: SeriesVolume) -> str:
    uid = vol.sop_class_uid
    if uid == ENHANCED_MR:
        return str(MRImageStorage)
    if uid == ENHANCED_CT:
        return str(CTImageStorage)
    if uid in (CTImageStorage, MRImageStorage):
        return uid
    if vol.modality == "CT":
        return str(CTImageStorage)
    if vol.modality == "MR":
        return str(MRImageStorage)
    raise DeriveError(f"series {vol.series_uid}: SOP class {uid} ({vol.modality}) has no derived-image "
                      "template; only CT and MR series can be super-resolved")


def _stored_dtype(ref: Dataset) -> tuple[np.dtype[Any], float, float]:
    bits = int(ref.get("BitsStored", 16) or 16)
    signed = bool(int(ref.get("PixelRepresentation", 0) or 0))
    alloc = int(ref.get("BitsAllocated", 16) or 16)
    dt = np.dtype(("int" if signed else "uint") + str(max(alloc, 8)))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return dt, float(lo), float(hi)


def _contributing_equipment(engine: str, engine_version: str, fallback: str, now: _dt.datetime) -> Dataset:
    item = Dataset()
    item.Manufacturer = "srnode"
    item.ManufacturerModelName = "srnode"
    item.SoftwareVersions = [f"srnode {__version__}", f"pipeline {PIPELINE_VERSION}", f"{engine} {engine_version}"]
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    desc = f"Super-resolution by srnode {__version__}, engine {engine} {engine_version}"
    if fallback:
        desc += f" (fallback: {fallback})"
    item.ContributionDescription = desc[:1024]
    item.PurposeOfReferenceCodeSequence = DicomSequence([code_item("109103", "DCM", "Modifying Equipment")])
    return item


def _source_item(ds: Dataset, frame: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = str(ds.get("SOPClassUID", "") or ds.file_meta.MediaStorageSOPClassUID)
    item.ReferencedSOPInstanceUID = sop_instance_of(ds)
    if frame > 0:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [code_item("121322", "DCM", "Source image for image processing operation")])
    return item


def referenced_series(series_uid: str, instances: Sequence[tuple[str, str]]) -> DicomSequence:
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


def check_identifiers(vol: SeriesVolume) -> None:
    """DeriveError when the input lacks the UIDs a derived series must share (checked before the engine runs)."""
    study_uid = str(vol.datasets[0].get("StudyInstanceUID", "") or "")
    if not study_uid or not vol.series_uid:
        raise DeriveError(f"series {vol.series_uid or '(no SeriesInstanceUID)'}: the input has an empty "
                          "StudyInstanceUID or SeriesInstanceUID; a derived series cannot be filed beside it")
    _output_sop_class(vol)


def derive_series(vol: SeriesVolume, result: EngineResult, factors: Factors, cfg: DeriveConfig,
                  engine_version: str = "") -> DerivedObjects:
    """Build the derived image series (and the uncertainty SC series when ``cfg.uncertainty``)."""
    ref0 = vol.datasets[0]
    check_identifiers(vol)
    expect = output_shape(vol.shape, factors)
    if tuple(result.data.shape) != expect:
        raise DeriveError(f"series {vol.series_uid}: engine {result.engine} returned shape {result.data.shape}, "
                          f"expected {expect}")
    sop_class = _output_sop_class(vol)
    now = _dt.datetime.now()
    series_uid = derived_uid(cfg, vol, factors, result.engine, "derived")
    f, g = factors.through_plane, factors.in_plane
    positions = output_positions(vol, factors)
    nz = positions.shape[0]
    step = vol.spacing[0] / f
    thickness = step if (f > 1 and vol.shape[0] > 1) else vol.slice_thickness
    dy, dx = vol.spacing[1] / g, vol.spacing[2] / g
    dtype, lo, hi = _stored_dtype(ref0)
    slope, icpt = vol.rescale_slope, vol.rescale_intercept
    desc = str(ref0.get("SeriesDescription", "") or vol.modality)
    if vol.run:
        desc += f" run {vol.run[0]}/{vol.run[1]}"
    desc = (desc + cfg.series_description_suffix)[:64]
    series_number = int(ref0.get("SeriesNumber") or 0) + cfg.series_number_offset + (vol.run[0] - 1 if vol.run else 0)
    equipment = _contributing_equipment(result.engine, engine_version, result.fallback, now)
    derivation = (f"srnode {__version__}: super-resolution x{f} through-plane, x{g} in-plane by engine "
                  f"{result.engine} {engine_version}" + (f"; fallback: {result.fallback}" if result.fallback else ""))
    iop = [ds_str(v) for v in (*vol.row_cosine, *vol.col_cosine)]
    windows = _windows(ref0)
    out: list[Dataset] = []
    for k in range(nz):
        i, r = divmod(k, f)
        near = min(i + (1 if 2 * r > f else 0), vol.shape[0] - 1)
        ref = vol.datasets[near]
        frame = vol.frame_numbers[near] if vol.frame_numbers else 0
        ds = Dataset()
        # SOP Common
        ds.SpecificCharacterSet = ref.get("SpecificCharacterSet", "ISO_IR 100")
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = derived_uid(cfg, vol, factors, result.engine, "derived", str(k))
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        # Patient
        _copy(ds, ref, _PATIENT)
        # General Study
        _copy(ds, ref, _STUDY)
        # General Series
        _copy(ds, ref, _SERIES)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = desc
        ds.SeriesDate = now.strftime("%Y%m%d")
        ds.SeriesTime = now.strftime("%H%M%S")
        # Frame of Reference
        _copy(ds, ref, _FRAME_OF_REFERENCE)
        # General Equipment (the acquiring scanner; srnode is named in ContributingEquipmentSequence)
        _copy(ds, ref, _EQUIPMENT)
        ds.SoftwareVersions = f"srnode {__version__}"
        ds.ContributingEquipmentSequence = DicomSequence([equipment])
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
        _copy(ds, ref, _ACQUISITION)
        ds.ImageType = ["DERIVED", "SECONDARY"] + [str(v) for v in list(ref.get("ImageType") or [])[2:3]]
        ds.DerivationDescription = derivation[:1024]
        ds.DerivationCodeSequence = DicomSequence([code_item("113085", "DCM", "Spatial resampling")])
        src = [_source_item(vol.datasets[i], vol.frame_numbers[i] if vol.frame_numbers else 0)]
        if r and i + 1 < vol.shape[0]:
            src.append(_source_item(vol.datasets[i + 1], vol.frame_numbers[i + 1] if vol.frame_numbers else 0))
        ds.SourceImageSequence = DicomSequence(src)
        # Common Instance Reference (the instances this object references)
        ds.ReferencedSeriesSequence = referenced_series(
            vol.series_uid, [(it.ReferencedSOPClassUID, it.ReferencedSOPInstanceUID) for it in src])
        # Image Plane
        ds.PixelSpacing = [ds_str(dy), ds_str(dx)]
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [ds_str(v) for v in positions[k]]
        if thickness > 0:
            ds.SliceThickness = ds_str(thickness)
        if vol.shape[0] > 1 and not vol.irregular:
            ds.SpacingBetweenSlices = ds_str(step)
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(result.data.shape[1]), int(result.data.shape[2])
        ds.BitsAllocated = dtype.itemsize * 8
        ds.BitsStored = int(ref.get("BitsStored", ds.BitsAllocated))
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
        # CT Image / MR Image
        if sop_class == CTImageStorage:
            _copy(ds, ref, _CT_IMAGE, from_groups=True)
        else:
            _copy(ds, ref, _MR_IMAGE, from_groups=True)
            _mr_type1(ds, ref, frame)
        # Modality LUT (rescale kept from the input so stored values mean the same)
        if sop_class == CTImageStorage or slope != 1.0 or icpt != 0.0:
            ds.RescaleIntercept = ds_str(icpt)
            ds.RescaleSlope = ds_str(slope)
            if sop_class == CTImageStorage:
                ds.RescaleType = "HU"
        # VOI LUT
        if windows:
            ds.WindowCenter, ds.WindowWidth = windows
        # stored = (value - intercept) / slope, clipped to the input's stored range (one slice at a time)
        stored = np.clip(np.rint((result.data[k].astype(np.float64) - icpt) / slope), lo, hi).astype(dtype)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        add_file_meta(ds)
        out.append(ds)
    geometry_gate(out, vol, factors)
    sc: list[Dataset] = []
    sc_uid = derived_uid(cfg, vol, factors, result.engine, "sigma")
    if cfg.uncertainty:
        from node.uncertainty import uncertainty_series  # imports this module's helpers

        sc = uncertainty_series(out, result.sigma, vol, sc_uid, cfg, factors, result.engine, equipment)
    log.info("series %s: derived %d slices into %s (engine %s%s)", vol.series_uid, nz, series_uid, result.engine,
             f", fallback: {result.fallback}" if result.fallback else "")
    return DerivedObjects(out, sc, series_uid, sc_uid)


def _windows(ref: Dataset) -> tuple[Any, Any] | None:
    c, w = group_value(ref, "WindowCenter"), group_value(ref, "WindowWidth")
    if c is None or w is None or c == "" or w == "":
        return None
    return c, w


def _mr_type1(ds: Dataset, ref: Dataset, frame: int) -> None:
    """Classic MR Image type 1/2 attributes that an enhanced MR input keeps only in functional groups."""
    if "ScanningSequence" not in ds:
        pulse = str(group_value(ref, "EchoPulseSequence") or "")
        seq = {"GRADIENT": ["GR"], "SPIN": ["SE"], "BOTH": ["SE", "GR"]}.get(pulse, ["RM"])
        if str(group_value(ref, "InversionRecovery") or "") == "YES":
            seq.append("IR")
        ds.ScanningSequence = seq
    if "IR" in list(ds.ScanningSequence) and not ds.get("InversionTime"):
        ti = group_value(ref, "InversionTimes")  # FD, VM 1-n, in the MR Modifier functional group
        values = [] if ti is None else [ti] if isinstance(ti, (int, float)) else list(ti)
        ds.InversionTime = ds_str(values[0]) if values else ""
    if "SequenceVariant" not in ds:
        ds.SequenceVariant = "NONE"
    if "EchoTime" not in ds or ds.EchoTime in ("", None):
        te = group_value(ref, "EffectiveEchoTime")
        ds.EchoTime = ds_str(te) if te is not None else ""
    if "RepetitionTime" not in ds:
        tr = group_value(ref, "RepetitionTime")
        if tr is not None:
            ds.RepetitionTime = tr


def add_file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


# ---------------------------------------------------------------------------------------------- gate


def geometry_gate(derived: Sequence[Dataset], vol: SeriesVolume, factors: Factors) -> None:
    """Re-check the derived objects' geometry against the input volume; DeriveError names what is wrong."""
    f, g = factors.through_plane, factors.in_plane
    name = f"series {vol.series_uid}: derived geometry gate"
    n = vol.shape[0]
    want_n = (n - 1) * f + 1
    if len(derived) != want_n:
        raise DeriveError(f"{name}: {len(derived)} slices, expected {want_n}")
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in derived])
    dy, dx = vol.spacing[1], vol.spacing[2]
    shift = (g - 1) / (2 * g) * (dx * vol.row_cosine + dy * vol.col_cosine)
    for k_in, k_out in ((0, 0), (n - 1, want_n - 1)):
        err = float(np.linalg.norm(ipp[k_out] + shift - vol.positions[k_in]))
        if err > GEOMETRY_TOL_MM:
            raise DeriveError(f"{name}: slice {k_out + 1} is {err:.4f} mm off input slice {k_in + 1}")
    if n > 1:
        steps = np.diff(ipp @ vol.normal)
        want = vol.spacing[0] / f
        if not vol.irregular and np.max(np.abs(steps - want)) > max(GEOMETRY_TOL_MM, 0.011 * want * f):
            raise DeriveError(f"{name}: step varies ({steps.min():.4f}..{steps.max():.4f} mm), expected {want:.4f}")
        # every position on the original slice line
        for k in range(want_n):
            i = min(k // f, n - 2)
            a, b = vol.positions[i], vol.positions[i + 1]
            p = ipp[k] + shift
            t = float(np.dot(p - a, b - a) / max(float(np.dot(b - a, b - a)), 1e-12))
            off = float(np.linalg.norm(a + t * (b - a) - p))
            if off > GEOMETRY_TOL_MM or t < -1e-6 or t > 1 + 1e-6:
                raise DeriveError(f"{name}: slice {k + 1} is {off:.4f} mm off the original slice line")
    ps = [float(v) for v in derived[0].PixelSpacing]
    if abs(ps[0] - dy / g) > 1e-6 * max(1.0, dy) or abs(ps[1] - dx / g) > 1e-6 * max(1.0, dx):
        raise DeriveError(f"{name}: PixelSpacing {ps}, expected {[dy / g, dx / g]}")
    rows, cols = vol.shape[1] * g, vol.shape[2] * g
    for d in (derived[0], derived[-1]):
        if int(d.Rows) != rows or int(d.Columns) != cols:
            raise DeriveError(f"{name}: matrix {d.Rows}x{d.Columns}, expected {rows}x{cols}")
        iop = np.array([float(v) for v in d.ImageOrientationPatient])
        if np.max(np.abs(iop - np.concatenate([vol.row_cosine, vol.col_cosine]))) > 1e-6:
            raise DeriveError(f"{name}: ImageOrientationPatient changed")
        if f > 1 and "SliceThickness" in d and abs(float(d.SliceThickness) - vol.spacing[0] / f) > 1e-6:
            raise DeriveError(f"{name}: SliceThickness {d.SliceThickness}, expected {vol.spacing[0] / f:.6g}")
