"""The derived image series (pydicom), and with it the uncertainty Secondary Capture series (``node.derived.uncertainty``).

The derived series sits in the input's study and frame of reference, with new UIDs that are deterministic from
(input SeriesInstanceUID, PIPELINE_VERSION, factors, engine, run) so that reprocessing is recognisable. Patient,
study and acquisition attributes are copied from the nearest input slice (a whitelist per module, never private
tags; ``node.derived.modules``); geometry is recomputed from the input positions exactly as ``models.engine``
documents it, then checked again by ``geometry_gate`` (``node.derived.geometry``) before anything leaves.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, MRImageStorage

from models.engine import EngineResult, Factors, output_shape
from node import __version__
from node.config import DeriveConfig
from node.derived.classic import classic_ct_values, classic_mr_values
from node.derived.geometry import geometry_gate, output_positions
from node.derived.modules import (
    ACQUISITION,
    CT_IMAGE,
    DENOISE_NOTE,
    EQUIPMENT,
    FRAME_OF_REFERENCE,
    MR_IMAGE,
    PATIENT,
    SERIES,
    STUDY,
    add_file_meta,
    code_item,
    contributing_equipment,
    copy_module,
    derived_uid,
    ds_str,
    referenced_series,
    source_item,
)
from node.errors import DeriveError
from node.series import ENHANCED_CT, ENHANCED_MR, SeriesVolume, group_value

log = logging.getLogger(__name__)


@dataclass
class DerivedObjects:
    derived: list[Dataset]
    uncertainty: list[Dataset]
    derived_series_uid: str
    uncertainty_series_uid: str


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
    denoised = bool(result.report.get("denoised"))
    made_by = result.engine + ("+denoise" if denoised else "")  # what produced the pixels: feeds the UIDs
    series_uid = derived_uid(cfg, vol, factors, made_by, "derived")
    f, g = factors.through_plane, factors.in_plane
    positions = output_positions(vol, factors)
    nz = positions.shape[0]
    step = vol.spacing[0] / f
    thickness = step if (f > 1 and vol.shape[0] > 1) else vol.slice_thickness
    dy, dx = vol.spacing[1] / g, vol.spacing[2] / g
    dtype, lo, hi = _stored_dtype(ref0)
    slope, icpt = vol.rescale_slope, vol.rescale_intercept
    desc = str(ref0.get("SeriesDescription", "") or vol.modality)
    tail = (f" {vol.volume_label}" if vol.volume else "") + (f" run {vol.run[0]}/{vol.run[1]}" if vol.run else "")
    tail += cfg.series_description_suffix
    desc = desc[:max(0, 64 - len(tail))] + tail[:64]  # the volume / run label and suffix are never cut off
    # two numbers per derived series (its uncertainty series takes the next): distinct for every volume and run
    series_number = int(ref0.get("SeriesNumber") or 0) + cfg.series_number_offset + 2 * vol.part
    equipment = contributing_equipment(result.engine, engine_version, result.fallback, now, denoised)
    derivation = (f"srnode {__version__}: " + (f"{DENOISE_NOTE}, then " if denoised else "")
                  + f"super-resolution x{f} through-plane, x{g} in-plane by engine {result.engine} {engine_version}"
                  + (f"; fallback: {result.fallback}" if result.fallback else ""))
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
        ds.SOPInstanceUID = derived_uid(cfg, vol, factors, made_by, "derived", str(k))
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        # Patient
        copy_module(ds, ref, PATIENT)
        # General Study
        copy_module(ds, ref, STUDY)
        # General Series
        copy_module(ds, ref, SERIES)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = desc
        ds.SeriesDate = now.strftime("%Y%m%d")
        ds.SeriesTime = now.strftime("%H%M%S")
        # Frame of Reference
        copy_module(ds, ref, FRAME_OF_REFERENCE)
        # General Equipment (the acquiring scanner; srnode is named in ContributingEquipmentSequence)
        copy_module(ds, ref, EQUIPMENT)
        ds.SoftwareVersions = f"srnode {__version__}"
        ds.ContributingEquipmentSequence = DicomSequence([equipment])
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
        copy_module(ds, ref, ACQUISITION)
        ds.ImageType = ["DERIVED", "SECONDARY"] + [str(v) for v in list(ref.get("ImageType") or [])[2:3]]
        ds.DerivationDescription = derivation[:1024]
        ds.DerivationCodeSequence = DicomSequence([code_item("113085", "DCM", "Spatial resampling")])
        src = [source_item(vol.datasets[i], vol.frame_numbers[i] if vol.frame_numbers else 0)]
        if r and i + 1 < vol.shape[0]:
            src.append(source_item(vol.datasets[i + 1], vol.frame_numbers[i + 1] if vol.frame_numbers else 0))
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
            copy_module(ds, ref, CT_IMAGE, from_groups=True)
            classic_ct_values(ds)
        else:
            copy_module(ds, ref, MR_IMAGE, from_groups=True)
            _mr_type1(ds, ref, frame)
            classic_mr_values(ds)
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
    sc_uid = derived_uid(cfg, vol, factors, made_by, "sigma")
    if cfg.uncertainty:
        # highdicom is imported only when the SC series is made
        from node.derived.uncertainty import uncertainty_series

        sc = uncertainty_series(out, result.sigma, vol, sc_uid, cfg, factors, made_by, equipment)
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
