"""The uncertainty objects: the engine's per-voxel 1-sigma as a Parametric Map and/or a Secondary Capture card.

``[derive] uncertainty`` (``node.config.UncertaintyObject``) chooses:

- ``parametric_map``: one multi-frame Parametric Map (PS3.3 A.75; highdicom ``pm.ParametricMap``) per derived
  volume. Float32 pixels (FloatPixelData) hold sigma itself; a Real World Value Mapping (identity, value range
  0 .. max sigma) names the unit in UCUM: Hounsfield unit ``[hnsf'U]`` for CT, arbitrary unit ``[arb'U]``
  otherwise (the derived series' values are modality units; MR signal has no physical unit), and the quantity
  (DCM 113061 "Standard Deviation"). Frame k is derived slice k: its Plane Position is that slice's exact
  ImagePositionPatient; orientation, pixel spacing, slice thickness and spacing are shared; the frame of reference
  is the derived series' (= the source's). Its source images are the derived series' instances: sigma is a
  value per voxel of the derived estimate on the derived grid (frame k describes derived slice k), and the derived
  series in turn references the acquired images it was made from, so the chain back to the acquisition is whole.
- ``secondary_capture``: one small RGB card per derived volume: the middle derived slice's sigma through a
  matplotlib colour map with a colour bar in the modality's units. A picture, not a measurement: it carries no
  plane, orientation or frame of reference (attributes the SC IOD, PS3.3 A.8.1, does not define).
- ``both``: the two, each in its own series (the map at the derived SeriesNumber + 1, the card at + 2).

Patient and study attributes are copied from the derived slice exactly (the source's SpecificCharacterSet, so
names keep their bytes, ISO 2022 included). Engines without sigma get no uncertainty object at all (the caller
checks ``EngineResult.has_sigma``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from node import __version__
from node.config import UncertaintyObject
from node.derived.modules import PATIENT, STUDY, add_file_meta, character_set, referenced_series, source_item
from node.errors import DeriveError
from node.series import MAX_MODALITY_ABS

HOUNSFIELD = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
ARBITRARY = Code("[arb'U]", "UCUM", "arbitrary unit")
STANDARD_DEVIATION = Code("113061", "DCM", "Standard Deviation")
LUT_LABEL = "SIGMA"  # SH, at most 16 characters
CARD_DPI = 100
CARD_INCHES = (6.4, 5.2)  # 640 x 520 pixels


@dataclass(frozen=True)
class SigmaSeries:
    """One uncertainty series to write: its SeriesInstanceUID, SOPInstanceUID (one instance), SeriesNumber and
    SeriesDescription (``node.derived.labels``)."""

    series_uid: str
    sop_uid: str
    number: int
    description: str


# CT RescaleType defined terms with a physical unit (PS3.3 C.11.1.1.2) -> (UCUM code, short text, long text); OD,
# US (unspecified) and HU_MOD (a vendor's modified scale) name none: arbitrary units
_CT_UNITS: dict[str, tuple[Code, str, str]] = {
    "HU": (HOUNSFIELD, "HU", "HU"),
    "MGML": (Code("mg/mL", "UCUM", "milligram per milliliter"), "mg/mL", "mg/mL"),
    "Z_EFF": (Code("1", "UCUM", "no units"), "Z_eff", "effective atomic number"),
    "ED": (Code("10*23/mL", "UCUM", "10^23 electrons per milliliter"), "1e23 e/mL", "10^23 electrons per mL"),
    "EDW": (Code("1", "UCUM", "no units"), "ED/water", "electron density relative to water"),
    "PCT": (Code("%", "UCUM", "percent"), "%", "percent"),
}


def units(modality: str, rescale_type: str = "") -> tuple[Code, str, str]:
    """Sigma's unit (that of the derived values) as a UCUM code, its short text and its long text: Hounsfield unit
    ('HU') for a CT whose ``rescale_type`` (the derived slices' RescaleType) is absent or HU; the stated unit for a
    CT in another defined term that has one (MGML: mg/mL, Z_EFF, ED, EDW, PCT; PS3.3 C.11.1.1.2); else arbitrary
    unit ('a.u.': MR signal, US, OD, HU_MOD)."""
    if modality == "CT":
        known = _CT_UNITS.get(rescale_type.strip().upper() or "HU")
        if known is not None:
            return known
    return ARBITRARY, "a.u.", f"{modality or 'image'} signal, arbitrary units"


def clean_sigma(sigma: np.ndarray) -> np.ndarray:
    """``sigma`` as float32 with non-finite and negative values set to 0 (a 1-sigma is finite and >= 0)."""
    sig = np.asarray(sigma, dtype=np.float32)
    return np.where(np.isfinite(sig), np.maximum(sig, 0.0), 0.0).astype(np.float32, copy=False)


def display_max(sig: np.ndarray) -> float:
    """The top of sigma's display range: its 99th percentile (every slice, every 4th row and column), at least 1.

    Every slice: with a through-plane factor f, every f-th derived slice is an acquired one, where sigma is far
    smaller; a stride along z sharing a factor with f sampled those alone (the shared fMRI's map said 0-1 a.u. while
    its new slices' sigma reached 570-2400)."""
    sub = sig[:, ::4, ::4]
    return max(float(np.percentile(sub, 99)) if sub.size else 0.0, 1.0)


def uncertainty_objects(derived: Sequence[Dataset], sigma: np.ndarray, modality: str, kind: UncertaintyObject,
                        engine: str, equipment: Dataset, *, parametric_map: SigmaSeries | None,
                        card: SigmaSeries | None) -> list[Dataset]:
    """The sigma objects ``kind`` asks for: [Parametric Map][, SC card] (each with file meta).

    ``derived``: the derived slices in output order (not empty; a list, or ``DerivedSlices.headers()`` that makes
    each when asked: the map reads each once and keeps only its ``FRAME_KEYWORDS``); ``sigma``: (Z', Y', X')
    1-sigma per voxel in modality units (HU for CT), the derived slices' shape; non-finite or negative values become 0.
    ``parametric_map`` / ``card``: the series to write (needed when ``kind`` asks for it; ValueError otherwise).
    DeriveError when sigma reaches beyond ``node.series.MAX_MODALITY_ABS`` (the map's window and value range
    could not be written validly: refused, not clipped).
    """
    sig = clean_sigma(sigma)
    top = float(sig.max()) if sig.size else 0.0
    if top > MAX_MODALITY_ABS:
        raise DeriveError(f"the engine's uncertainty (sigma) reaches {top:.3g}, beyond the {MAX_MODALITY_ABS:g} "
                          "an uncertainty object can hold; none is written")
    out: list[Dataset] = []
    if kind.parametric_map:
        if parametric_map is None:
            raise ValueError("uncertainty_objects: kind asks for a parametric map and no series was given")
        out.append(sigma_parametric_map(derived, sig, modality, engine, equipment, parametric_map))
    if kind.card:
        if card is None:
            raise ValueError("uncertainty_objects: kind asks for a card and no series was given")
        out.append(sigma_card(derived, sig, modality, engine, equipment, card))
    return out


def _real_world_sigma(d0: Dataset, smax: float) -> list[Any]:
    """sigma in the real-world units of the derived series: one more mapping for each of the derived slices'
    linear RealWorldValueMappingSequence items (the input's, restated: a Philips ScaleSlope, a standard mapping;
    ``node.derived.values.real_world_mapping``). A mapping real = a * value + c takes a 1-sigma of s modality units
    to |a| * s real-world units (the intercept moves no spread), so a quantitative reader gets sigma in the units in
    which it reads the derived values (field18: the map gave it only in displayed units, 180.9x off the Philips
    precise values)."""
    out = []
    slope = float(d0.get("RescaleSlope", 1) or 1)
    for item in d0.get("RealWorldValueMappingSequence") or []:
        m = item.get("RealWorldValueSlope")
        if m is None or not slope:
            continue
        code = (item.get("MeasurementUnitsCodeSequence") or [None])[0]
        unit = (Code(str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning))
                if code is not None else Code("1", "UCUM", "no units"))
        label = str(item.get("LUTLabel", "") or "RWV")
        out.append(hd.pm.RealWorldValueMapping(
            lut_label=f"{label[:13]}_SD",
            lut_explanation=f"1-sigma uncertainty in {label} units"[:64],
            unit=unit,
            value_range=(0.0, smax),
            slope=abs(float(m)) / slope,
            intercept=0.0,
            quantity_definition=STANDARD_DEVIATION,
        ))
    return out


def _without_charset(d: Dataset) -> Dataset:
    """``d``'s elements without SpecificCharacterSet (a new element map over the same elements).

    highdicom checks SpecificCharacterSet against its own list, which lacks the ISO 2022 form with an empty first
    value (``['', 'ISO 2022 IR 87']``, Japanese / Korean); the source's value is set on the result afterwards.
    """
    if "SpecificCharacterSet" not in d:
        return d
    ref = Dataset()
    for elem in d:
        if elem.keyword != "SpecificCharacterSet":
            ref.add(elem)
    return ref


def _patient_study(obj: Dataset, d: Dataset, description: str, equipment: Dataset) -> None:
    """The derived slice's character set, patient and study attributes as they are (same bytes, so the PACS files
    the object under the same patient), SeriesDescription, body part and srnode as contributing equipment."""
    charset = character_set(d)
    if charset is not None:
        obj.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in obj:
        del obj.SpecificCharacterSet
    for kw in (*PATIENT, *STUDY):
        if kw in d:
            obj[kw] = copy.deepcopy(d[kw])
    obj.SeriesDescription = description[:64]
    for kw in ("BodyPartExamined", "Laterality"):
        if d.get(kw):
            setattr(obj, kw, d.get(kw))
    obj.ContributingEquipmentSequence = DicomSequence([copy.deepcopy(equipment)])


# what the map reads of each derived slice but the first (its frame's position; highdicom's checks that the sources
# are one series, one matrix, one frame of reference and one orientation; its source and derivation references)
FRAME_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                  "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def frame_source(d: Dataset) -> Dataset:
    """A Dataset holding ``d``'s ``FRAME_KEYWORDS`` elements only (the same element objects): what the Parametric
    Map needs of a derived slice, so that the map of a long series does not hold every derived slice's header."""
    out = Dataset()
    for kw in FRAME_KEYWORDS:
        if kw in d:
            out[kw] = d[kw]
    return out


def sigma_parametric_map(derived: Sequence[Dataset], sig: np.ndarray, modality: str, engine: str, equipment: Dataset,
                         series: SigmaSeries) -> Dataset:
    """One Parametric Map of ``sig`` ((Z', Y', X') float32, >= 0, modality units) on the derived slices' grid.

    Frame k: derived slice k's ImagePositionPatient (exact); FloatPixelData = sigma (no rescale); see the module's
    docstring for the mapping, units and references.
    """
    d0 = derived[0]
    frames = [d0] + [frame_source(derived[k]) for k in range(1, len(derived))]  # each made once, its frame kept
    unit, short, _ = units(modality, str(d0.get("RescaleType", "") or ""))
    smax = float(sig.max()) if sig.size else 0.0
    width = display_max(sig)
    step = float(d0.get("SpacingBetweenSlices") or 0.0)
    if not step and len(frames) > 1:
        step = float(np.linalg.norm(np.subtract([float(v) for v in frames[1].ImagePositionPatient],
                                                [float(v) for v in d0.ImagePositionPatient])))
    thickness = float(d0.get("SliceThickness") or 0.0) or step or 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation=f"1-sigma uncertainty of the SR estimate ({short})",
        unit=unit,
        value_range=(0.0, max(smax, 0.0)),
        slope=1.0,
        intercept=0.0,
        quantity_definition=STANDARD_DEVIATION,
    )
    mappings = [mapping, *_real_world_sigma(d0, max(smax, 0.0))]
    sources = [_without_charset(d) for d in frames]
    with warnings.catch_warnings():
        # highdicom warns about unusual person names by quoting them: never let a name reach a log
        warnings.simplefilter("ignore", UserWarning)
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=sig,
            series_instance_uid=series.series_uid,
            series_number=series.number,
            sop_instance_uid=series.sop_uid,
            instance_number=1,
            manufacturer="srnode",
            manufacturer_model_name="srnode",
            software_versions=f"srnode {__version__}",
            device_serial_number="none",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=mappings,
            voi_lut_transformations=[hd.VOILUTTransformation(
                window_center=[width / 2], window_width=[width],
                window_explanation=["sigma 0 to its 99th percentile"])],
            content_label="SIGMA",
            content_description=f"1-sigma uncertainty of the {engine} super-resolution ({short})"[:64],
            pixel_measures=hd.PixelMeasuresSequence(
                pixel_spacing=[float(v) for v in d0.PixelSpacing], slice_thickness=thickness,
                spacing_between_slices=step or None),
            plane_orientation=hd.PlaneOrientationSequence(
                coordinate_system="PATIENT", image_orientation=[float(v) for v in d0.ImageOrientationPatient]),
            plane_positions=[hd.PlanePositionSequence(
                coordinate_system="PATIENT", image_position=[float(v) for v in d.ImagePositionPatient])
                for d in frames],
            content_qualification="RESEARCH",
            derived_pixel_contrast="STD_DEVIATION",  # Image Type value 4: the map is a standard deviation
            specific_character_set=None,
        )
    _patient_study(pm, d0, series.description, equipment)
    if "BodyPartExamined" not in pm and "Laterality" not in pm:
        pm.Laterality = ""  # General Series type 2C; dciodvfy wants it when the body part is unknown (as the card)
    _derived_order(pm, frames, sig)
    return pm


def _derived_order(pm: Dataset, derived: list[Dataset], sig: np.ndarray) -> None:
    """Put ``pm``'s frames in the derived series' slice order (frame k = derived slice k) with its exact
    ImagePositionPatient text.

    highdicom sorts the frames along its own slice normal, which may run against the derived series' order; each
    per-frame item keeps its Dimension Index Values (the spatial rank) and its reference to the derived slice at
    that position, so only the items and the pixel frames move. DeriveError when a frame has no derived slice at
    its position (1 µm).
    """
    wanted = np.array([[float(v) for v in d.ImagePositionPatient] for d in derived])
    items = list(pm.PerFrameFunctionalGroupsSequence)
    placed: list[Dataset | None] = [None] * len(derived)
    for item in items:
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        k = int(np.argmin(np.linalg.norm(wanted - ipp, axis=1)))
        if placed[k] is not None or float(np.linalg.norm(wanted[k] - ipp)) > 1e-3:
            raise DeriveError("uncertainty map: a frame's position matches no derived slice")
        placed[k] = item
    ordered = [item for item in placed if item is not None]
    if len(ordered) != len(derived):
        raise DeriveError("uncertainty map: a derived slice has no frame")
    for item, d in zip(ordered, derived, strict=True):
        item.PlanePositionSequence[0].ImagePositionPatient = d.ImagePositionPatient
    pm.PerFrameFunctionalGroupsSequence = DicomSequence(ordered)
    pm.FloatPixelData = np.ascontiguousarray(sig, dtype="<f4").tobytes()


def _orientation_letter(v: np.ndarray) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # DICOM LPS: +x left, +y posterior, +z head
    axis = int(np.argmax(np.abs(v)))
    return letters[axis][0] if v[axis] > 0 else letters[axis][1]


def card_pixels(sig: np.ndarray, k: int, units_long: str, title: str, aspect: float) -> np.ndarray:
    """The card's RGB pixels ((520, 640, 3) uint8): slice ``k`` of ``sig`` (inferno, 0 .. 99th percentile of the
    volume) with a colour bar labelled ``sigma (<units_long>)`` and ``title`` above. ``aspect``: row / column
    spacing (mm / mm), so the slice is drawn in square millimetres. matplotlib's Agg canvas (no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=CARD_INCHES, dpi=CARD_DPI, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.04, 0.06, 0.74, 0.80))
    ax.set_facecolor("black")
    im = ax.imshow(sig[k], cmap="inferno", vmin=0.0, vmax=display_max(sig), aspect=aspect,
                   interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes((0.82, 0.10, 0.035, 0.72))
    bar = fig.colorbar(im, cax=cax)
    bar.set_label(f"\u03c3 ({units_long})", color="white", fontsize=11)
    bar.ax.tick_params(colors="white", labelsize=9)
    fig.text(0.04, 0.94, title, color="white", fontsize=11, va="center")
    fig.text(0.04, 0.895, f"derived slice {k + 1} of {sig.shape[0]}; 1-\u03c3 uncertainty of the SR estimate",
             color="#bbbbbb", fontsize=9, va="center")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def sigma_card(derived: Sequence[Dataset], sig: np.ndarray, modality: str, engine: str, equipment: Dataset,
               series: SigmaSeries) -> Dataset:
    """One Secondary Capture (RGB, 8 bit) card of the middle derived slice's sigma with a colour bar; no Image
    Plane or Frame of Reference attributes (not in the SC IOD). PatientOrientation: the slice's row and column
    directions as drawn. No patient text on the card (BurnedInAnnotation NO)."""
    k = len(derived) // 2
    d = derived[k]
    _, short, units_long = units(modality, str(d.get("RescaleType", "") or ""))
    dy, dx = (float(v) for v in d.PixelSpacing)
    title = f"{engine} \u03c3 ({short})"
    pixels = card_pixels(sig, k, units_long, title, dy / dx if dx > 0 else 1.0)
    iop = [float(v) for v in d.ImageOrientationPatient]
    orient = (_orientation_letter(np.array(iop[:3])), _orientation_letter(np.array(iop[3:])))
    ref = _without_charset(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # person-name warnings quote the name
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series.series_uid,
            series_number=series.number,
            sop_instance_uid=series.sop_uid,
            instance_number=1,
            manufacturer="srnode",
            patient_orientation=orient,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
    _patient_study(sc, d, series.description, equipment)
    if "BodyPartExamined" not in sc and "Laterality" not in sc:
        sc.Laterality = ""  # type 2C; dciodvfy wants it when the body part is unknown
    sc.ImageType = ["DERIVED", "SECONDARY", "UNCERTAINTY"]
    sc.SoftwareVersions = f"srnode {__version__}"  # node.own: a marker that survives de-identification, as the
    # derived images' and the map's
    sc.DerivationDescription = (f"Colour-mapped per-pixel 1-sigma uncertainty of the {engine} super-resolution "
                                f"in {units_long}, derived slice {k + 1} of {len(derived)}")[:1024]
    sc.BurnedInAnnotation = "NO"
    for kw in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if kw in d:  # drawn from lossy images: said as on the derived slice (PS3.3 C.7.6.1.1.5)
            sc[kw] = d[kw]
    sc.SourceImageSequence = DicomSequence([source_item(d, 0)])  # the derived slice drawn
    sc.ReferencedSeriesSequence = referenced_series(d.SeriesInstanceUID, [(d.SOPClassUID, d.SOPInstanceUID)])
    for kw in ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
               "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation"):
        if kw in sc:
            del sc[kw]
    add_file_meta(sc)
    return sc

