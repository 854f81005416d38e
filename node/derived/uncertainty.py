"""The uncertainty series: one highdicom Secondary Capture per derived slice, sigma in modality units.

Stored value x RescaleSlope + RescaleIntercept = 1-sigma of the derived voxel (HU for CT, RescaleType says which);
the window spans 0 .. the 99th percentile of sigma. Each SC references its derived slice (SourceImageSequence) and
the derived series, and carries the derived slice's plane (not part of the SC IOD) so viewers can line it up.
"""

from __future__ import annotations

import copy
import warnings

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from models.engine import Factors
from node.config import DeriveConfig
from node.derived.modules import (
    PATIENT,
    STUDY,
    add_file_meta,
    character_set,
    derived_uid,
    ds_str,
    referenced_series,
    source_item,
)
from node.series import SeriesVolume


def _orientation_letter(v: np.ndarray) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # DICOM LPS: +x left, +y posterior, +z head
    axis = int(np.argmax(np.abs(v)))
    return letters[axis][0] if v[axis] > 0 else letters[axis][1]


def uncertainty_series(derived: list[Dataset], sigma: np.ndarray, vol: SeriesVolume, series_uid: str,
                       cfg: DeriveConfig, factors: Factors, engine: str, equipment: Dataset,
                       description: str = "") -> list[Dataset]:
    """One single-frame Secondary Capture per derived slice; stored value x RescaleSlope = sigma.

    ``sigma``: (Z', Y', X') 1-sigma per voxel, modality units (HU for CT), same shape as the derived slices;
    non-finite or negative values are stored as 0. Stored as uint16 with slope max(sigma, 1e-3) / 65000
    (Secondary Capture Image IOD, PS3.3 A.8.1; Modality LUT, PS3.3 C.11.1). ``derived`` must not be empty.
    ``description``: the series' SeriesDescription (``node.derived.labels``; default: the derived one + " sigma");
    its SeriesNumber is the derived series' + 1.
    """
    sig = np.asarray(sigma, dtype=np.float32)
    finite = np.isfinite(sig)
    smax = float(np.max(sig, initial=0.0, where=finite)) if sig.size else 0.0
    slope = max(smax, 1e-3) / 65000.0
    sub = sig[::2, ::4, ::4]
    p99 = float(np.percentile(np.where(np.isfinite(sub), sub, 0.0), 99)) if sig.size else 0.0
    width = max(p99, 1.0)
    units = "HU" if vol.modality == "CT" else "US"
    orient = (_orientation_letter(vol.row_cosine), _orientation_letter(vol.col_cosine))
    template = _template(derived[0], series_uid, orient, engine, units, slope, width, equipment,
                         description or (str(derived[0].SeriesDescription)[:58] + " sigma"))
    out: list[Dataset] = []
    for k, d in enumerate(derived):
        sc = copy.deepcopy(template)
        sc.SOPInstanceUID = derived_uid(cfg, vol, factors, engine, "sigma", str(k))
        sc.InstanceNumber = k + 1
        # General Image: the derived slice this sigma belongs to
        sc.SourceImageSequence = DicomSequence([source_item(d, 0)])
        # Common Instance Reference
        sc.ReferencedSeriesSequence = referenced_series(d.SeriesInstanceUID, [(d.SOPClassUID, d.SOPInstanceUID)])
        # Image Plane (not in the SC IOD; lets viewers line it up with the derived slice)
        sc.ImagePositionPatient = d.ImagePositionPatient
        # Image Pixel: stored value = sigma / RescaleSlope
        plane = np.where(finite[k], np.maximum(sig[k], 0.0), 0.0)
        sc.PixelData = np.clip(np.rint(plane / slope), 0, 65535).astype(np.uint16).tobytes()
        add_file_meta(sc)
        out.append(sc)
    return out


def _template(d: Dataset, series_uid: str, orient: tuple[str, str], engine: str, units: str, slope: float,
              width: float, equipment: Dataset, description: str) -> Dataset:
    """The attributes every SC of the series shares, built once with highdicom (pixel data left out)."""
    with warnings.catch_warnings():
        # highdicom warns about unusual person names by quoting them: never let a name reach a log
        warnings.simplefilter("ignore", UserWarning)
        sc = _sc_image(d, np.zeros((int(d.Rows), int(d.Columns)), np.uint16), series_uid, d.SOPInstanceUID, 0,
                       orient)
    del sc.PixelData
    # SOP Common: the derived slice's (= the source's) character set, and its patient and study attributes as they
    # are, so the names keep their bytes and the PACS files both series under the same patient
    charset = character_set(d)
    if charset is not None:
        sc.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in sc:
        del sc.SpecificCharacterSet
    for kw in (*PATIENT, *STUDY):
        if kw in d:
            sc[kw] = copy.deepcopy(d[kw])
    # General Series
    sc.SeriesDescription = description[:64]
    for kw in ("BodyPartExamined", "Laterality"):
        if d.get(kw):
            setattr(sc, kw, d.get(kw))
    if "BodyPartExamined" not in sc and "Laterality" not in sc:
        sc.Laterality = ""  # type 2C; dciodvfy wants it when the body part is unknown
    # General Image: what this is
    sc.ImageType = ["DERIVED", "SECONDARY", "UNCERTAINTY"]
    sc.DerivationDescription = (f"Per-pixel 1-sigma uncertainty of the {engine} super-resolution, in {units}; "
                                "sigma = stored value * RescaleSlope + RescaleIntercept")[:1024]
    sc.ContributingEquipmentSequence = DicomSequence([equipment])  # type: ignore[assignment]
    # Frame of Reference + Image Plane orientation (not in the SC IOD)
    sc.FrameOfReferenceUID = d.FrameOfReferenceUID
    sc.ImageOrientationPatient = d.ImageOrientationPatient
    # Modality LUT: the sigma mapping
    sc.RescaleIntercept = "0"
    sc.RescaleSlope = ds_str(slope)
    sc.RescaleType = units
    # VOI LUT: 0 .. p99 of sigma
    sc.WindowCenter = ds_str(width / 2)
    sc.WindowWidth = ds_str(width)
    return sc


def _sc_image(d: Dataset, pixels: np.ndarray, series_uid: str, sop_uid: str, k: int,
              orient: tuple[str, str]) -> hd.sc.SCImage:
    """A Secondary Capture image whose Patient, General Study and Patient Study modules come from ``d``.

    highdicom checks SpecificCharacterSet against its own list, which lacks the ISO 2022 form with an empty first
    value (``['', 'ISO 2022 IR 87']``, Japanese / Korean); the caller sets the source's character set on the
    result itself (``modules.character_set``), so ``d`` is handed over without it.
    """
    ref = d
    if "SpecificCharacterSet" in d:
        ref = Dataset()  # a new element map over the same elements: ``d`` itself keeps its character set
        for elem in d:
            if elem.keyword != "SpecificCharacterSet":
                ref.add(elem)
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=16,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=int(d.SeriesNumber) + 1,
        sop_instance_uid=sop_uid,
        instance_number=k + 1,
        manufacturer="srnode",
        pixel_spacing=(float(d.PixelSpacing[0]), float(d.PixelSpacing[1])),  # type: ignore[arg-type] # mm (floats; highdicom annotates int)
        patient_orientation=orient,
    )
