"""DICOM headers → placed slices: SOP class checks, enhanced multi-frame functional groups, one ``Slice`` per image.

Each image (a single-frame instance, or one frame of an enhanced multi-frame object) becomes a ``Slice`` that
carries its position, orientation and pixel spacing (from ImagePositionPatient / ImageOrientationPatient /
PixelSpacing, or from the Plane Position / Plane Orientation / Pixel Measures functional groups) and its
Rescale Slope / Intercept. ``node.series.load`` stacks them into a ``SeriesVolume`` and decodes the pixels.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from node.dicom_read import read_dicom
from node.errors import VolumeError, dicom_read_problem
from node.series.realworld import real_world_of

# SOP classes that carry no image a volume can be built from
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT plans, structures, doses
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, segmentation
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage (PS3.4 B.5)
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage (PS3.4 B.5)

# what pydicom raises on malformed headers, lazily, when a value is first read (untrusted input)
MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, struct.error,
             RecursionError, NotImplementedError, BytesLengthException, InvalidDicomError)


def read_header(path: Path) -> Dataset:
    """Header only (no pixels); VolumeError names the file when it is not DICOM."""
    return read_dataset(path, pixels=False)


def sop_class_of(ds: Dataset) -> str:
    """SOPClassUID, falling back to the file meta's MediaStorageSOPClassUID (some PET/CT files leave it empty)."""
    return _uid_or_meta(ds, "SOPClassUID", "MediaStorageSOPClassUID")


def sop_instance_of(ds: Dataset) -> str:
    """SOPInstanceUID, falling back to the file meta's MediaStorageSOPInstanceUID."""
    return _uid_or_meta(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID")


def _uid_or_meta(ds: Dataset, keyword: str, meta_keyword: str) -> str:
    uid = str(ds.get(keyword, "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(ds.file_meta.get(meta_keyword, "") or "")
    return uid


def is_image_sop_class(uid: str) -> bool:
    """False for an empty UID and for the non-image families (SR, encapsulated documents, waveforms,
    presentation states, RT objects, raw data / registration / segmentation, real world value mapping)."""
    return bool(uid) and not any(uid.startswith(p) for p in _NON_IMAGE_PREFIXES)


def read_dataset(path: Path, pixels: bool = True) -> Dataset:
    """The whole file (or, ``pixels=False``, its header only; pixels are not decoded here either way).

    VolumeError names the file when it cannot be read or is not DICOM.
    """
    try:
        return read_dicom(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, EOFError, *MALFORMED) as exc:
        raise VolumeError(f"{path.name}: not a readable DICOM file ({dicom_read_problem(exc)})") from exc


def _floats(value: Any, n: int, what: str, name: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{name}: {what} is not numeric ({value!r})") from exc
    if out.shape != (n,):
        raise VolumeError(f"{name}: {what} needs {n} values, has {len(out)}")
    return out


def frame_group_item(ds: Dataset, seq: str, frame: int) -> Dataset | None:
    """The item of functional group ``seq`` for ``frame`` (0-based): per-frame first, then shared."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        g = ds.get(groups)
        if g is not None and len(g) > idx and seq in g[idx] and len(g[idx][seq].value) > 0:
            return g[idx][seq].value[0]  # type: ignore[no-any-return]
    return None


def group_value(ds: Dataset, keyword: str) -> Any:
    """``keyword`` from the top level, else from the first frame's (or the shared) functional groups."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        g = ds.get(groups)
        if not g:
            continue
        for seq_elem in g[0]:
            if seq_elem.VR == "SQ" and len(seq_elem.value) > 0 and keyword in seq_elem.value[0]:
                return seq_elem.value[0].get(keyword)
    return None


@dataclass
class Slice:
    """One image placed in patient space: a single-frame instance, or one frame of a multi-frame object.

    ``ipp`` (3,) mm and ``iop`` (6,) direction cosines, float64 (PS3.3 C.7.6.2 Image Plane / C.7.6.16.2
    functional groups); ``spacing`` (row, column) = (dy, dx) mm; ``thickness`` mm (0 when absent); ``slope`` /
    ``intercept`` map stored values to modality units (PS3.3 C.11.1); ``stated`` says whether RescaleSlope and
    RescaleIntercept were stated (present and not empty) for this image, or are the defaults 1 and 0.

    ``ds`` is the header while it is held; a single-frame image read from a file lets go of it as soon as it is
    read (``node.series.load``, issue #15 item 5): what the load reads of it later is taken first (``take``,
    read back by ``value``), its modality values are in ``values`` and ``file`` names where it was read from.
    """

    ds: Dataset | None
    name: str
    frame: int  # 0-based frame in ds; -1 for single-frame
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]
    thickness: float
    slope: float
    intercept: float
    file: Path | None = None  # the file a header let go of was read from (for its stored pixels, read again)
    values: np.ndarray | BaseException | None = None  # (Y, X) float32 modality values taken at read, or why not
    taken: dict[str, Any] = field(default_factory=dict, repr=False)  # header values taken before ``ds`` went
    stated: tuple[bool, bool] = (True, True)  # (RescaleSlope, RescaleIntercept) stated, not defaulted

    @property
    def where(self) -> str:
        """How refusals name this image: its file, with " (frame N)" for a frame of a multi-frame object."""
        return self.name + (f" (frame {self.frame + 1})" if self.frame >= 0 else "")

    @property
    def header(self) -> Dataset:
        """The held header; RuntimeError (a programming error, not a malformed input) once it was let go of."""
        if self.ds is None:
            raise RuntimeError(f"{self.name}: the header was let go of; its values are read with Slice.value")
        return self.ds

    def value(self, key: str, how: Callable[[Slice], Any]) -> Any:
        """``how(self)``: a value of the header named ``key``, read now from the held header or, once it was let
        go of, as taken then. An error reading it then is raised now, as reading it now would have raised it (so
        a load refuses at the same step, with the same message, as when it read every header first)."""
        if key in self.taken:
            got = self.taken[key]
            if isinstance(got, _Failed):
                raise got.error
            return got
        return how(self)

    def take(self, readers: Iterable[tuple[str, Callable[[Slice], Any]]]) -> None:
        """Read the values ``value`` will be asked for (key, how) from the held header, each value or the error
        reading it raised."""
        for key, how in readers:
            try:
                self.taken[key] = how(self)
            except Exception as exc:  # noqa: BLE001 - raised again, as it was, when the value is asked for
                self.taken[key] = _Failed(exc)


@dataclass(frozen=True)
class _Failed:
    error: Exception


def _text(keyword: str) -> Callable[[Slice], str]:
    def read(s: Slice) -> str:
        return str(s.header.get(keyword, "") or "")
    return read


def _rescale_type(s: Slice) -> str:
    """The units of the slice's modality values (RescaleType, PS3.3 C.11.1.1.2), from the frame's Pixel Value
    Transformation functional group for a frame of an enhanced object (else its top level, as the rescale);
    "" when absent."""
    item = (frame_group_item(s.header, "PixelValueTransformationSequence", s.frame) or _top_level_rescale(s.header)
            if s.frame >= 0 else s.header)
    return str((item.get("RescaleType", "") if item is not None else "") or "").strip().upper()


# what the load reads of every image's header once it is stacked (key -> how); ``header_value`` reads them
HEADER_VALUES: Mapping[str, Callable[[Slice], Any]] = MappingProxyType({
    "SeriesInstanceUID": lambda s: str(s.header.get("SeriesInstanceUID", "")),
    "FrameOfReferenceUID": _text("FrameOfReferenceUID"),
    "Modality": _text("Modality"),
    "PhotometricInterpretation": _text("PhotometricInterpretation"),
    "Rows": lambda s: int(s.header.Rows),
    "Columns": lambda s: int(s.header.Columns),
    "RescaleType": lambda s: _rescale_type(s),
    "localizer": lambda s: is_localizer(s.header),
    "sop_class": lambda s: sop_class_of(s.header),
    # the real-world value mappings it states, as lines of its modality values (node.series.realworld)
    "real_world": lambda s: real_world_of(s.header, s.frame, s.slope, s.intercept, s.where),
})


def header_value(s: Slice, key: str) -> Any:
    """The ``HEADER_VALUES`` value ``key`` of slice ``s`` (``Slice.value``)."""
    return s.value(key, HEADER_VALUES[key])


def slices_of(ds: Dataset, name: str) -> list[Slice]:
    """The placed slices of one dataset (one per frame; ``name`` is used in messages).

    Enhanced objects take geometry from the Plane Position / Plane Orientation / Pixel Measures functional
    groups, per frame first, then shared (PS3.3 C.7.6.16), and their rescale from the Pixel Value Transformation
    group (else from the top level, where some converters write it). VolumeError when a frame's geometry is
    missing, the per-frame groups do not hold one item per frame, a multi-frame object has no functional groups,
    or a value is not numeric or has the wrong count.
    """
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != nframes:
        # one item per frame (PS3.3 C.7.6.16): a count that differs leaves frames out or places them without
        # their own geometry; which of the two is wrong cannot be told
        raise VolumeError(f"{name}: NumberOfFrames {nframes} but PerFrameFunctionalGroupsSequence has "
                          f"{len(per_frame)} item(s); the frames cannot be told apart, none is stacked")
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        out: list[Slice] = []
        for f in range(nframes):
            pos = frame_group_item(ds, "PlanePositionSequence", f)
            ori = frame_group_item(ds, "PlaneOrientationSequence", f)
            meas = frame_group_item(ds, "PixelMeasuresSequence", f)
            # no Pixel Value Transformation group: a rescale stated at the top level (converters write it there)
            # is the only one stated, never ignored
            pvt = frame_group_item(ds, "PixelValueTransformationSequence", f) or _top_level_rescale(ds)
            if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
                raise VolumeError(f"{name}: frame {f + 1} lacks Plane Position / Plane Orientation / Pixel "
                                  "Measures functional groups; its geometry is unknown")
            out.append(_placed(ds, name, f, pos, ori, meas, pvt))
        return out
    if nframes > 1:
        raise VolumeError(f"{name}: multi-frame object with {nframes} frames but no functional groups; "
                          "per-frame geometry is unknown")
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds or ds[kw].value is None or ds[kw].VM == 0:
            raise VolumeError(f"{name}: {kw} is missing; the slice cannot be placed in patient space")
    return [_placed(ds, name, -1, ds, ds, ds, ds)]


def _placed(ds: Dataset, name: str, frame: int, pos: Dataset, ori: Dataset, meas: Dataset,
            pvt: Dataset | None) -> Slice:
    """A Slice from the items holding its Plane Position, Plane Orientation, Pixel Measures and Pixel Value
    Transformation (functional group items of a frame, or the single-frame dataset itself for all four)."""
    ps = _floats(meas.PixelSpacing, 2, "PixelSpacing", name)
    return Slice(
        ds, name, frame,
        _floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", name),
        _floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", name),
        (float(ps[0]), float(ps[1])),
        float(meas.get("SliceThickness", 0) or 0),
        _number(pvt, "RescaleSlope", 1.0),
        _number(pvt, "RescaleIntercept", 0.0),
        stated=(_stated(pvt, "RescaleSlope"), _stated(pvt, "RescaleIntercept")),
    )


def _top_level_rescale(ds: Dataset) -> Dataset | None:
    """``ds`` itself when it states a rescale at its top level (RescaleSlope, RescaleIntercept or RescaleType;
    not where an enhanced object's standard puts it, but where some converters do), else None."""
    return ds if any(kw in ds for kw in ("RescaleSlope", "RescaleIntercept", "RescaleType")) else None


def _stated(ds: Dataset | None, keyword: str) -> bool:
    """Whether ``keyword`` is present with a value in ``ds`` (``_number`` gives its default otherwise)."""
    value = ds.get(keyword) if ds is not None else None
    return not (value is None or (isinstance(value, str) and not value.strip()))


def _number(ds: Dataset | None, keyword: str, default: float) -> float:
    """``keyword``'s value as a float; ``default`` only when it is absent or empty (a present 0 stays 0)."""
    value = ds.get(keyword) if ds is not None else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    return float(value)


IOP_UNIT_TOL = 1e-3  # |cos(row, col)| above this: not two orthogonal directions
IOP_MIN_NORM = 1e-6  # a direction vector shorter than this (zero) gives no direction


def unit_orientation(iop: Any, where: str) -> tuple[np.ndarray, bool]:
    """ImageOrientationPatient ``iop`` (six numbers) as two unit vectors (6,) float64, and whether they were
    written with a norm off 1 beyond the rounding of six written digits (a vendor's 0.9999, a converter's 2.0).
    Two orthogonal directions of any norm are what they say (PS3.3 C.7.6.2.1.1 wants unit vectors; every measure
    made from them, a position included, assumes it). VolumeError naming ``where`` when they are not two non-zero
    orthogonal directions (or not finite): the image cannot be placed."""
    vec = np.asarray([float(v) for v in iop], dtype=np.float64)
    row, col = vec[:3], vec[3:]
    nr, nc = (float(np.linalg.norm(v)) if v.shape == (3,) and np.all(np.isfinite(v)) else 0.0 for v in (row, col))
    if not (nr > IOP_MIN_NORM and nc > IOP_MIN_NORM and abs(float(row @ col)) / (nr * nc) < IOP_UNIT_TOL):
        raise VolumeError(f"{where}: ImageOrientationPatient {[round(float(v), 6) for v in vec]} is not two "
                          "orthogonal unit vectors (row and column directions); the slice cannot be placed")
    return np.concatenate([row / nr, col / nc]), max(abs(nr - 1.0), abs(nc - 1.0)) > 1e-5


def stored_pixels(s: Slice) -> np.ndarray:
    """The slice's stored pixel values as decoded (frame ``s.frame`` of a multi-frame object): from the held
    header, else from its file read again (only for the wording of a refusal or to compare two copies)."""
    ds = s.ds if s.ds is not None else read_dicom(s.file) if s.file is not None else s.header
    arr = ds.pixel_array
    return arr[s.frame] if s.frame >= 0 and arr.ndim == 3 else arr  # type: ignore[no-any-return]


def is_localizer(ds: Dataset) -> bool:
    """Whether ImageType has a LOCALIZER value (a scout, PS3.3 C.8.2.1.1.1)."""
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]
