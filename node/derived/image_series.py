"""The derived image series (pydicom), and with it the uncertainty objects (``node.derived.uncertainty``).

The derived series sits in the input's study and frame of reference, with new UIDs that are deterministic from
(input SeriesInstanceUID and SOPInstanceUIDs, PIPELINE_VERSION, factors, engine, run, the [derive] settings
that change the objects' labels: ``node.derived.modules.derived_uid``) so that reprocessing is recognisable.
Patient, study, series and equipment attributes are copied from the first input instance into every derived
slice, acquisition and CT/MR image attributes from the nearest input slice (a whitelist per module, never
private tags; ``node.derived.modules``); geometry is recomputed from the input positions exactly as
``models.engine`` documents it, then checked again by ``geometry_gate`` (``node.derived.geometry``) before
anything leaves.

Values and display (``node.derived.values``, ``node.series.display``): one output rescale holds every value of
every input slice and of the engine's result (never a clip to the first slice's range); the photometric
interpretation of the source is kept (MONOCHROME1 stays MONOCHROME1); the window is the series' own (median over
its slices), not the first slice's. SliceThickness is the acquired nominal thickness for every engine: the new
step is written as SpacingBetweenSlices and in the positions, never as a thickness the output does not have.
"""

from __future__ import annotations

import collections.abc
import copy
import datetime as _dt
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, MRImageStorage

from models.engine import EngineResult, Factors, output_shape
from node import __version__
from node.config import DeriveConfig
from node.derived.classic import classic_ct_values, classic_mr_values
from node.derived.geometry import geometry_gate, output_positions
from node.derived.labels import Revision, series_descriptions
from node.derived.labels import series_number as labelled_number
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
    character_set,
    code_item,
    coding_scheme_item,
    contributing_equipment,
    copy_module,
    derived_uid,
    ds_str,
    referenced_series,
    source_ref,
    state_deidentification,
)
from node.derived.values import CT_MIN_BITS, output_format, real_world_mapping, to_stored
from node.errors import DeriveError
from node.own import SRNODE_CODE
from node.series import (
    ENHANCED_CT,
    ENHANCED_MR,
    MAX_MODALITY_ABS,
    SeriesVolume,
    group_value,
    series_photometric,
    series_voi,
    series_window,
)

log = logging.getLogger(__name__)


class DerivedSlices(collections.abc.Sequence[Dataset]):
    """The derived slices of ``derive_series(lazy=True)``, made one at a time: item ``k`` is a new Dataset built
    from the input headers and ``result.data[k]`` when it is asked for (the same elements and bytes as the eager
    list's item k), and nothing of it is kept. ``headers()``: the same slices without PixelData (what the geometry
    gate and the uncertainty objects read). A long series thus never holds every derived slice at once (issue #15
    item 5: 2N Datasets of ~37 KB each were most of the memory a 64² series held per slice)."""

    def __init__(self, make: Callable[[int, bool], Dataset], count: int, pixels: bool = True) -> None:
        self._make, self._count, self._pixels = make, count, pixels

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, k: int) -> Dataset:  # type: ignore[override]  # slices are not asked for
        if not isinstance(k, int):
            raise TypeError("DerivedSlices: index by int")
        if k < 0:
            k += self._count
        if not 0 <= k < self._count:
            raise IndexError(k)
        return self._make(k, self._pixels)

    def __iter__(self) -> collections.abc.Iterator[Dataset]:
        return (self._make(k, self._pixels) for k in range(self._count))

    def headers(self) -> DerivedSlices:
        """The same slices without PixelData."""
        return DerivedSlices(self._make, self._count, pixels=False)


@dataclass
class DerivedObjects:
    """What ``derive_series`` built: the derived slices (in output slice order: a list, or with ``lazy`` a
    ``DerivedSlices`` that makes each when asked), the uncertainty objects (the Parametric Map and/or the SC card,
    ``[derive] uncertainty``; [] when it is "none" or the engine has no sigma) and the series' UIDs:
    ``uncertainty_series_uid`` is the first uncertainty object's series ("" when none was made),
    ``uncertainty_series_uids`` every uncertainty object's series, in order."""

    derived: collections.abc.Sequence[Dataset]
    uncertainty: list[Dataset]
    derived_series_uid: str
    uncertainty_series_uid: str
    notes: list[str] = field(default_factory=list)  # what was changed from the source's format, for the job report
    uncertainty_series_uids: list[str] = field(default_factory=list)


# the Modality a CT or MR image's SOP class states (PS3.3 C.8.2.1.1.1, C.8.3.1.1: an enumerated value of its IOD)
_CLASS_MODALITY = {str(CTImageStorage): "CT", ENHANCED_CT: "CT", str(MRImageStorage): "MR", ENHANCED_MR: "MR"}


def _output_sop_class(vol: SeriesVolume) -> str:
    """The derived slices' SOP class: CT or MR Image Storage, from the input's SOP class, else its Modality.
    DeriveError when neither is CT or MR, or when a CT or MR SOP class comes with another Modality (a CT image
    stored as MR, or with Modality PT: which one is right cannot be told, and a derived object would state both)."""
    uid = vol.sop_class_uid
    stated = _CLASS_MODALITY.get(uid)
    if stated is not None:
        if vol.modality and vol.modality != stated:
            raise DeriveError(f"series {vol.series_uid}: its SOP class is {stated} Image Storage ({uid}) but its "
                              f"Modality is {vol.modality!r}: which one is right cannot be told, so nothing is "
                              "derived from it")
        return str(CTImageStorage) if stated == "CT" else str(MRImageStorage)
    if vol.modality == "CT":
        return str(CTImageStorage)
    if vol.modality == "MR":
        return str(MRImageStorage)
    raise DeriveError(f"series {vol.series_uid}: SOP class {uid} ({vol.modality}) has no derived-image "
                      "template; only CT and MR series can be super-resolved")


def check_identifiers(vol: SeriesVolume) -> None:
    """DeriveError when the input lacks the UIDs a derived series must share, or its SOP class and modality
    have no derived-image template (only CT and MR) (checked before the engine runs)."""
    study_uid = vol.datasets.record(0).study_uid if len(vol.datasets) else ""
    if not study_uid or not vol.series_uid:
        raise DeriveError(f"series {vol.series_uid or '(no SeriesInstanceUID)'}: the input has an empty "
                          "StudyInstanceUID or SeriesInstanceUID; a derived series cannot be filed beside it")
    _output_sop_class(vol)


def derive_series(vol: SeriesVolume, result: EngineResult, factors: Factors, cfg: DeriveConfig,
                  engine_version: str = "", settings: str = "", revision: Revision | None = None,
                  lazy: bool = False) -> DerivedObjects:
    """Build the derived image series, and the uncertainty objects ``cfg.uncertainty`` names when the engine has
    a sigma (``result.has_sigma``; ``node.derived.uncertainty``).

    ``result.data`` is (Z', Y', X') float32 in modality units on the output grid of ``models.engine``. Raises
    DeriveError when the shape breaks that contract, the output holds non-finite values, or the geometry gate fails.
    ``settings``: a digest of the engine's settings and weights (``node.process.engines.settings_digest``); it
    enters the UIDs only, so other settings give other SOP instances, and the same settings the same UIDs.
    ``revision``: what decides the result's revision (``node.derived.labels.Revision``, from the series' earlier
    result: a superseding result gets another SeriesNumber, a replay with the same UIDs the same one; UIDs of an
    older result a later one retired are reissued with a counter, ``Revision.retired``, and the
    DerivationDescription says "UIDs reissued (n)").
    ``lazy``: ``DerivedObjects.derived`` is a ``DerivedSlices`` that builds slice k (headers and PixelData,
    ``to_stored`` of ``result.data[k]``) each time it is asked for and keeps nothing, so that a long series never
    holds every derived slice at once (issue #15 item 5); the objects are the same as the eager list's (one
    ``now`` for the series, deterministic UIDs). The geometry gate (and the uncertainty objects, when made) read
    the headers before this returns, so a failing gate still raises before anything is written; that builds every
    slice's headers twice (once here, once when written). Each derived slice copies its acquisition and CT/MR image
    attributes from the full header of its nearest input slice, ``vol.datasets[near]``: held, or read again from its file once the job released it
    (``node.series.InputHeaders``; DeriveError naming the file when it is gone or replaced); its source references
    come from the input slices' records. The Parametric Map keeps of each derived slice only what it reads
    (``node.derived.uncertainty.FRAME_KEYWORDS``).
    """
    ref0 = vol.datasets[0]
    check_identifiers(vol)
    expect = output_shape(vol.shape, factors)
    if tuple(result.data.shape) != expect:
        raise DeriveError(f"series {vol.series_uid}: engine {result.engine} returned shape {result.data.shape}, "
                          f"expected {expect}")
    sop_class = _output_sop_class(vol)
    now = _dt.datetime.now()
    denoised = bool(result.report.get("denoised"))
    made_by = result.engine + ("+denoise" if denoised else "")  # what produced the pixels: labels and UIDs
    uid_by = made_by + (f"|{settings}" if settings else "")  # and with which settings and weights: UIDs only
    series_uid = derived_uid(cfg, vol, factors, uid_by, "derived")
    # the UIDs of an older result a later one retired (settings A, B, then A again): never made again, as a PACS
    # that took the rejection note holds them rejected; a counter in every UID's entropy reissues them
    reissued = 0
    while revision is not None and revision.retired(series_uid):
        reissued += 1
        series_uid = derived_uid(cfg, vol, factors, f"{uid_by}|reissue{reissued}", "derived")
    if reissued:
        uid_by = f"{uid_by}|reissue{reissued}"
    f, g = factors.through_plane, factors.in_plane
    positions = output_positions(vol, factors)
    nz = positions.shape[0]
    step = vol.spacing[0] / f
    thickness = vol.slice_thickness  # mm, acquired: the output is sampled every ``step``, not thinner slices
    dy, dx = vol.spacing[1] / g, vol.spacing[2] / g
    fmt, value_note = output_format(vol, result.data, CT_MIN_BITS if sop_class == CTImageStorage else 1)
    photometric, photo_note = series_photometric(vol)
    real_world, real_world_note = real_world_mapping(vol.real_world, fmt)
    notes = [n for n in (value_note, photo_note, real_world_note) if n]
    part_label = vol.volume_label if vol.volume else ""  # "echo 2", "time 3": one volume of several
    if vol.run:
        # one run of an irregular series is not the whole series: "run 1/1" would say it is
        if vol.run[1] == 1 and vol.run_slices:
            part_label += f" slices {vol.run_slices[0]}-{vol.run_slices[1]} of {vol.run_slices[2]}"
        else:
            part_label += f" run {vol.run[0]}/{vol.run[1]}"
        if vol.run_slices:
            notes.insert(0, f"run {vol.run[0]}/{vol.run[1]}: input slices {vol.run_slices[0]}-{vol.run_slices[1]} "
                            f"of {vol.run_slices[2]} (the series' slice steps are irregular)")
    # node.derived.labels: what a reader sees in the study list (volume/run, engine, factors, fallback, caution)
    desc, sigma_desc, card_desc = series_descriptions(str(ref0.get("SeriesDescription", "") or vol.modality), cfg, factors,
                                           made_by, bool(result.fallback), part_label.strip())
    # three numbers per derived series (its uncertainty series take the next two): distinct for every volume and run
    series_number = labelled_number(int(ref0.get("SeriesNumber") or 0), cfg.series_number_offset, made_by, factors,
                                    vol.part + 1, (revision or Revision()).of(series_uid))
    equipment = contributing_equipment(result.engine, engine_version, result.fallback, now, denoised)
    derivation = (f"srnode {__version__}: " + (f"{DENOISE_NOTE}, then " if denoised else "")
                  + f"super-resolution x{f} through-plane, x{g} in-plane by engine {result.engine} {engine_version}"
                  # which weights and engine settings: two derived series with the same digest were made alike
                  + (f" (settings and weights {settings})" if settings else "")
                  + (f"; fallback: {result.fallback}" if result.fallback else "")
                  + (f"; UIDs reissued ({reissued}): an earlier result with these settings was retired"
                     if reissued else "")
                  + "".join(f"; {n}" for n in notes))
    iop = [ds_str(v) for v in (*vol.row_cosine, *vol.col_cosine)]
    windows = series_window(vol)
    if windows and not all(math.isfinite(v) and abs(v) <= MAX_MODALITY_ABS for vals in windows for v in vals):
        windows = None  # a source window no reader or validator holds (VOI LUT is optional): not copied
    voi_function, voi_lut = series_voi(vol)  # the window's function and a VOI LUT table, as the source states them
    lossy = lossy_marking(vol)
    # Patient, General Study, General Series, Frame of Reference, General Equipment: one value per series, the first
    # input instance's, in every derived slice whichever input slice is nearest (a source whose slices disagree on
    # StudyDescription or PatientAge gave a derived series that disagreed with itself; the disagreement is noted by
    # ``node.derived.inputs.check_inputs``)
    series_level = Dataset()
    for module in (PATIENT, STUDY, SERIES, FRAME_OF_REFERENCE, EQUIPMENT):
        copy_module(series_level, ref0, module)
    state_deidentification(series_level)
    charset0 = character_set(ref0)
    acquisition_number = ref0.get("AcquisitionNumber")  # a value, read once: make() holds no header beyond its own
    if acquisition_number == "":
        acquisition_number = None

    def stored_pixels(k: int) -> bytes:
        return np.ascontiguousarray(to_stored(result.data[k], fmt)).tobytes()

    def make(k: int, pixels: bool) -> Dataset:
        i, r = divmod(k, f)
        near = min(i + (1 if 2 * r > f else 0), vol.shape[0] - 1)
        ref = vol.datasets[near]
        frame = vol.frame_numbers[near] if vol.frame_numbers else 0
        ds = Dataset()
        # SOP Common
        # the source's repertoire, so names keep their exact bytes; a slice copying from an input that states
        # another repertoire than the first (one name written in ISO_IR 126 and in UTF-8) gets UTF-8, which holds
        # the series' labels and the values it copies (either repertoire could lack a character of the other's)
        charset = character_set(ref)
        if charset != charset0:
            charset = "ISO_IR 192"
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = derived_uid(cfg, vol, factors, uid_by, "derived", str(k))
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        # the private coding scheme of srnode's code in DerivationCodeSequence, declared (PS3.3 C.12.1.1.4)
        ds.CodingSchemeIdentificationSequence = DicomSequence([coding_scheme_item(
            SRNODE_CODE[1], "srnode derivation codes", "srnode")])
        # Patient
        copy_module(ds, series_level, PATIENT)
        # General Study
        copy_module(ds, series_level, STUDY)
        # General Series
        copy_module(ds, series_level, SERIES)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = desc
        ds.SeriesDate = now.strftime("%Y%m%d")
        ds.SeriesTime = now.strftime("%H%M%S")
        # Frame of Reference
        copy_module(ds, series_level, FRAME_OF_REFERENCE)
        # General Equipment (the acquiring scanner; srnode is named in ContributingEquipmentSequence)
        copy_module(ds, series_level, EQUIPMENT)
        ds.SoftwareVersions = f"srnode {__version__}"
        ds.ContributingEquipmentSequence = DicomSequence([equipment])
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
        copy_module(ds, ref, ACQUISITION)
        ds.ImageType = ["DERIVED", "SECONDARY"] + [str(v) for v in list(ref.get("ImageType") or [])[2:3]]
        ds.DerivationDescription = derivation[:1024]
        # DICOM's code for what was done, and srnode's own (node.own: a marker that survives de-identification)
        ds.DerivationCodeSequence = DicomSequence([code_item("113085", "DCM", "Spatial resampling"),
                                                   code_item(*SRNODE_CODE)])
        for kw, value in lossy:  # PS3.3 C.7.6.1.1.5: once lossy, never reset in derived images
            setattr(ds, kw, value)
        src = [_source(vol, i)]
        if r and i + 1 < vol.shape[0]:
            src.append(_source(vol, i + 1))
        ds.SourceImageSequence = DicomSequence(src)
        # Common Instance Reference (the instances this object references)
        ds.ReferencedSeriesSequence = referenced_series(
            vol.series_uid, [(it.ReferencedSOPClassUID, it.ReferencedSOPInstanceUID) for it in src])
        # Image Plane
        ds.PixelSpacing = [ds_str(dy), ds_str(dx)]
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [ds_str(v) for v in positions[k]]
        ds.SliceThickness = ds_str(thickness) if thickness > 0 else ""  # type 2: empty when unknown
        if vol.shape[0] > 1 and not vol.irregular:
            ds.SpacingBetweenSlices = ds_str(step)
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = int(result.data.shape[1]), int(result.data.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = fmt.bits_stored
        ds.HighBit = fmt.bits_stored - 1
        ds.PixelRepresentation = 1 if fmt.signed else 0
        # CT Image / MR Image
        if sop_class == CTImageStorage:
            copy_module(ds, ref, CT_IMAGE, from_groups=True)
            classic_ct_values(ds)
        else:
            copy_module(ds, ref, MR_IMAGE, from_groups=True)
            _mr_type1(ds, ref, frame)
            classic_mr_values(ds)
        # one volume, one AcquisitionNumber (the first source image's): copied per slice from the passes of an
        # interleaved 2D acquisition (1, 1, 2, 2, ...) the derived series would read as two acquisitions
        # interleaved (node.series.split), and a reader could split it
        ds.AcquisitionNumber = acquisition_number  # Type 2: empty when the source has none
        # Modality LUT: one rescale for the series that holds every value (``node.derived.values``)
        if sop_class == CTImageStorage or fmt.slope != 1.0 or fmt.intercept != 0.0:
            ds.RescaleIntercept = ds_str(fmt.intercept)
            ds.RescaleSlope = ds_str(fmt.slope)
            if sop_class == CTImageStorage:  # the unit its slices state (a dual-energy map is no HU image)
                ds.RescaleType = ct_rescale_type(vol)
        # Real World Value Mapping (General Image, PS3.3 C.7.6.1; item macro C.7.6.16.2.11.1): the input's mapping
        # (a standard one, or Philips' private ScaleSlope, which no derived object copies) in the derived's own
        # stored values, so that a quantitative reader gets the same real-world value at the same place
        if real_world is not None:
            ds.RealWorldValueMappingSequence = real_world
        # VOI LUT: the series' window (median over its slices), in modality units
        if windows:
            centres, widths = ([ds_str(v) for v in vals] for vals in windows)
            ds.WindowCenter = centres if len(centres) > 1 else centres[0]
            ds.WindowWidth = widths if len(widths) > 1 else widths[0]
            if voi_function:
                ds.VOILUTFunction = voi_function
        if voi_lut is not None:
            ds.VOILUTSequence = [copy.deepcopy(voi_lut)]
        if pixels:
            ds.PixelData = stored_pixels(k)
        add_file_meta(ds)
        return ds

    slices = DerivedSlices(make, nz)
    headers = slices.headers() if lazy else [make(k, False) for k in range(nz)]
    geometry_gate(headers, vol, factors)
    sigma_objs: list[Dataset] = []
    kind = cfg.uncertainty
    if result.has_sigma and (kind.parametric_map or kind.card):
        # highdicom (and matplotlib for the card) are imported only when a sigma object is made
        from node.derived.uncertainty import SigmaSeries, uncertainty_objects

        pm = SigmaSeries(derived_uid(cfg, vol, factors, uid_by, "sigma"),
                         derived_uid(cfg, vol, factors, uid_by, "sigma", "map"), series_number + 1, sigma_desc)
        card = SigmaSeries(derived_uid(cfg, vol, factors, uid_by, "sigma-card", card=True),
                           derived_uid(cfg, vol, factors, uid_by, "sigma-card", "0", card=True),
                           series_number + (2 if kind.parametric_map else 1), card_desc)
        sigma_objs = uncertainty_objects(headers, result.sigma, vol.modality, kind, made_by, equipment,
                                         parametric_map=pm, card=card)
    sigma_uids = list(dict.fromkeys(str(x.SeriesInstanceUID) for x in sigma_objs))
    log.info("series %s: derived %d slices into %s (engine %s%s)", vol.series_uid, nz, series_uid, result.engine,
             f", fallback: {result.fallback}" if result.fallback else "")
    if not lazy:  # the eager list: the headers already made, with their pixels
        for k, ds in enumerate(headers):
            ds.PixelData = stored_pixels(k)
    return DerivedObjects(slices if lazy else headers, sigma_objs, series_uid, sigma_uids[0] if sigma_uids else "",
                          notes, sigma_uids)


def ct_rescale_type(vol: SeriesVolume) -> str:
    """The derived CT's RescaleType: "HU" unless the input's slices state another unit (PS3.3 C.8.2.1.1.11:
    MGML, Z_EFF, ED, ... of dual-energy maps; US: unspecified), which is kept; a stated value that is no Code
    String (at most 16 of A-Z, 0-9, space, _) becomes "US"."""
    unit = vol.rescale_type
    if not unit:
        return "HU"
    return unit if re.fullmatch(r"[A-Z0-9_ ]{1,16}", unit) else "US"


def lossy_marking(vol: SeriesVolume) -> list[tuple[str, str | list[str]]]:
    """The Lossy Image Compression attributes of every derived slice: [] when no input image has been through
    lossy compression (``SliceHeader.lossy``); else LossyImageCompression "01" (PS3.3 C.7.6.1.1.5: never reset in
    derived images), with LossyImageCompressionRatio / LossyImageCompressionMethod when every lossy input states
    the same ones (a method alone when no ratio is known)."""
    lossy = [rec.lossy for rec in vol.datasets.records if rec.lossy is not None]
    if not lossy:
        return []
    out: list[tuple[str, str | list[str]]] = [("LossyImageCompression", "01")]
    if len({(x.ratios, x.methods) for x in lossy}) == 1:
        ratios, methods = lossy[0].ratios, lossy[0].methods
        if ratios and len(ratios) == len(methods):
            out.append(("LossyImageCompressionRatio", list(ratios) if len(ratios) > 1 else ratios[0]))
        if methods and (not ratios or len(ratios) == len(methods)):
            out.append(("LossyImageCompressionMethod", list(methods) if len(methods) > 1 else methods[0]))
    return out


def _source(vol: SeriesVolume, i: int) -> Dataset:
    """The SourceImageSequence item of input slice ``i`` (from its record: no header is read)."""
    rec = vol.datasets.record(i)
    return source_ref(rec.sop_class_uid, rec.sop_instance_uid, vol.frame_numbers[i] if vol.frame_numbers else 0)


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
