"""The independent reader of ``srnode check``: input images (mosaic tiles included) and derived / uncertainty
objects, with pydicom and numpy only (nothing of ``node.series`` or ``node.derived``); an input file is read by
``node.dicom_read.read_dicom``, as everywhere srnode reads one (a data set without its preamble is DICOM there too).

Mosaics are read without the CSA parser: the number of images from (0019,100A), the grid from it, the first
tile's position from ImagePositionPatient corrected for the grid, and each tile's offset from the protocol's
slice centres (``sSliceArray.asSlice[k].sPosition`` in the ASCCONV text of the series header).
"""


from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.dicom_read import read_dicom

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SIGMA_CLASSES = (SECONDARY_CAPTURE, PARAMETRIC_MAP)  # the uncertainty objects: Parametric Map, SC card
POSITION_TOL_MM = 0.01
SPACING_REL_TOL = 1e-4


# transfer syntaxes that are lossy whatever the stream (PS3.5 Table A-1): JPEG baseline and extended
LOSSY_ONLY_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})


def input_rounding(positions: list[np.ndarray]) -> float:
    """0.1 or 0.01 when every component of the input ImagePositionPatient values is a multiple of it (written with
    one or two decimals, as some scanners and anonymisers do), else 0.0: the pipeline then takes a regular stack's
    positions from the line fitted through them, each within r/2 x sqrt(3) of the written one (``srnode check``
    accepts derived positions on that fitted line, not anywhere near the written ones)."""
    if not positions:
        return 0.0
    q0 = np.array(positions, dtype=np.float64)
    for r in (0.1, 0.01):
        q = q0 / r
        if bool(np.all(np.abs(q - np.round(q)) <= 1e-6)):
            return r
    return 0.0


def floats(v: Any) -> np.ndarray:
    return np.array([float(x) for x in v], dtype=np.float64)


def unit_iop(iop: np.ndarray) -> np.ndarray:
    """ImageOrientationPatient (6,) as two unit vectors (each 3-vector over its norm; a zero one left as it is):
    orientations are compared as directions, a vendor's 0.9999 or 2.0 norm aside (the node writes unit vectors)."""
    out = np.array(iop, dtype=np.float64)
    for k in (0, 3):
        n = float(np.linalg.norm(out[k:k + 3])) if out.shape == (6,) else 0.0
        if n > 0 and math.isfinite(n):
            out[k:k + 3] /= n
    return out


def _rescale_stated(item: Dataset | None) -> bool:
    """Whether RescaleSlope and RescaleIntercept are both present with a value in ``item`` (an image, or a frame's
    Pixel Value Transformation item)."""
    return item is not None and all(item.get(kw) is not None and str(item.get(kw)).strip()
                                    for kw in ("RescaleSlope", "RescaleIntercept"))


def _item(ds: Dataset, seq: str, frame: int) -> Dataset | None:
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        g = ds.get(groups)
        if g is not None and len(g) > idx and seq in g[idx] and len(g[idx][seq].value) > 0:
            return g[idx][seq].value[0]  # type: ignore[no-any-return]
    return None


@dataclass
class InImage:
    """One input image: a single-frame instance, a frame of a multi-frame object, or a tile of a mosaic."""

    file: Path
    sop: str
    series: str
    frame: int  # 1-based frame number of a multi-frame object, else 0
    tile: int  # 0-based tile of a mosaic, else -1
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]  # (row spacing dy, column spacing dx), mm
    rows: int
    cols: int
    slope: float
    intercept: float
    photometric: str
    padding: tuple[int, int] | None
    lossy: bool = False  # LossyImageCompression 01, or a lossy-only transfer syntax (JPEG baseline / extended)
    rescale_stated: bool = True  # RescaleSlope and RescaleIntercept both stated (not empty) for this image
    # the real-world value mappings it states as lines of its modality values, (a, c): real = a * modality + c
    # (RealWorldValueMappingSequence items with a slope; else Philips' ScaleSlope (2005,100E): a = 1 / (RS * SS))
    real_world: tuple[tuple[float, float], ...] = ()
    # (ConvolutionKernel, ContrastBolusAgent) as written at the top level ("" when absent; the agent as the node
    # compares it: ``_agent``): one derived volume of images that differ in either stacks two reconstructions or a
    # pre- and a post-contrast pass
    acquired_as: tuple[str, str] = ("", "")
    # what its header says of its series' size: (ImagesInAcquisition, NumberOfFrames, AcquisitionNumber) as
    # written ("" when absent; ``declared_instances``)
    declares: tuple[str, str, str] = ("", "", "")

    @property
    def name(self) -> str:
        extra = f" frame {self.frame}" if self.frame else f" mosaic image {self.tile + 1}" if self.tile >= 0 else ""
        return self.file.name + extra


def _padding(ds: Dataset) -> tuple[int, int] | None:
    a = _padding_value(ds, "PixelPaddingValue")
    if a is None:
        return None
    b = _padding_value(ds, "PixelPaddingRangeLimit")
    b = a if b is None else b
    return (min(a, b), max(a, b))


def _padding_value(ds: Dataset, keyword: str) -> int | None:
    """A padding value as a stored pixel value: its 16 bits read as PixelRepresentation says (a writer may use US
    for signed pixels or SS for unsigned ones, or UN bytes), not as the VR it was written with."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    signed = bool(int(ds.get("PixelRepresentation", 0) or 0))
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return None
        big = ds.original_encoding[1] is False
        return int.from_bytes(bytes(value[:2]), "big" if big else "little", signed=signed)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not value:
            return None
        value = value[0]
    v = int(value)
    if -(2 ** 15) <= v < 2 ** 16:
        v &= 0xFFFF
        return v - 2 ** 16 if signed and v >= 2 ** 15 else v
    return v


def _ascconv_positions(ds: Dataset, n: int) -> np.ndarray | None:
    """(n, 3) slice centres of the protocol (sSliceArray.asSlice[k].sPosition; absent components are 0)."""
    text = ""
    for elem in ds:
        if elem.tag.group == 0x0029 and isinstance(elem.value, bytes) and b"ASCCONV" in elem.value:
            text = elem.value.decode("latin-1", "replace")
            break
    if not text:
        return None
    out = np.zeros((n, 3))
    found = False
    for m in re.finditer(r"sSliceArray\.asSlice\[(\d+)\]\.sPosition\.d(Sag|Cor|Tra)\s*=\s*([-+0-9.eE]+)", text):
        k = int(m.group(1))
        if k < n:
            out[k, ("Sag", "Cor", "Tra").index(m.group(2))] = float(m.group(3))
            found = True
    return out if found else None


def _tile_order(centres: np.ndarray, first: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The protocol's slice centres (n, 3) in the mosaic's tile order. Siemens stores the tiles in spatial order,
    tile 0 at the mosaic's first position (``first``, from its ImagePositionPatient); sSliceArray lists the same
    slices in the protocol's order, which may run the other way (a protocol placed head to foot): tile k is the
    k-th centre along the slice normal from the end nearest ``first``. (Read as listed, tile k = asSlice[k], a
    reversed list put the derived series of such a mosaic 142 mm off its input: a right series FAILED.)"""
    along = centres @ normal
    order = np.argsort(along, kind="stable")
    if abs(float(along[order[-1]] - first @ normal)) < abs(float(along[order[0]] - first @ normal)):
        order = order[::-1]
    return centres[order]


def _number(value: object) -> float | None:
    if isinstance(value, (bytes, bytearray)):  # a private FL / FD read without its VR (implicit VR)
        return float(struct.unpack("<f" if len(value) == 4 else "<d", value)[0]) if len(value) in (4, 8) else None
    if isinstance(value, Sequence) and not isinstance(value, str):  # several values (a MultiValue): the first
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _agent(value: object) -> str:
    """A ContrastBolusAgent as the node compares it (console text, LO): upper case, runs of spaces as one, "" when
    absent, empty, NONE or NO ("Omnipaque 350" and "OMNIPAQUE  350" are one agent: review18)."""
    text = " ".join(_text(value).split()).upper()
    return "" if text in ("NONE", "NO") else text


def _text(value: object) -> str:
    """A header value as one text (several values joined by '/'), "" when absent or empty."""
    if value is None:
        return ""
    parts = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return "/".join(str(v).strip() for v in parts)


def real_world_lines(items: object, philips: Dataset | None, slope: float,
                     intercept: float) -> tuple[tuple[float, float], ...]:
    """The linear real-world mappings of RealWorldValueMappingSequence ``items`` (stored values -> real), else of
    the Philips ScaleSlope (2005,100E) in ``philips``, as (a, c) lines of modality values (rescale ``slope`` /
    ``intercept``): real = a * modality + c. Items given as a table are left out, and so
    are the pieces of a piecewise mapping (linear items over different ranges of stored values: no line holds for
    every value; ``node.series.realworld``, review18)."""
    out, ranges = [], set()
    for item in items or []:  # type: ignore[attr-defined]
        m, b = _number(item.get("RealWorldValueSlope")), _number(item.get("RealWorldValueIntercept"))
        if m is not None and b is not None and slope:
            out.append((m / slope, b - intercept * m / slope))
            ranges.add((str(item.get("RealWorldValueFirstValueMapped")),
                        str(item.get("RealWorldValueLastValueMapped"))))
    if len(ranges) > 1:
        out = []
    if out or philips is None:
        return tuple(out)
    try:
        block = philips.private_block(0x2005, "Philips MR Imaging DD 001")
        ss = _number(block[0x0E].value) if 0x0E in block else None
    except KeyError:
        ss = None
    return ((1.0 / (slope * ss), 0.0),) if ss and slope else ()


def _images_in_mosaic(ds: Dataset) -> int | None:
    try:
        return int(ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value)
    except (KeyError, ValueError, TypeError):
        return None


def _read_input(path: Path, ds: Dataset) -> list[InImage]:
    series, sop = str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    if not sop and hasattr(ds, "file_meta"):
        sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    rows, cols = int(ds.Rows), int(ds.Columns)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    pad = _padding(ds)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    lossy = str(ds.get("LossyImageCompression", "") or "").strip() == "01" or ts in LOSSY_ONLY_SYNTAXES
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for f in range(int(ds.get("NumberOfFrames", 1) or 1)):
            pos, ori = _item(ds, "PlanePositionSequence", f), _item(ds, "PlaneOrientationSequence", f)
            meas, pvt = _item(ds, "PixelMeasuresSequence", f), _item(ds, "PixelValueTransformationSequence", f)
            if pvt is None and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
                pvt = ds  # no functional group states a rescale: the top level's (where converters write it)
            if pos is None or ori is None or meas is None:
                continue
            ps = floats(meas.PixelSpacing)
            fs = float(pvt.get("RescaleSlope", 1) or 1) if pvt else 1.0
            fi = float(pvt.get("RescaleIntercept", 0) or 0) if pvt else 0.0
            groups = [g[i] for g, i in ((ds.PerFrameFunctionalGroupsSequence, f),
                                        (ds.get("SharedFunctionalGroupsSequence") or [], 0)) if len(g) > i]
            rwvm = next((g.RealWorldValueMappingSequence for g in groups if "RealWorldValueMappingSequence" in g),
                        None)
            out.append(InImage(path, sop, series, f + 1, -1, floats(pos.ImagePositionPatient),
                               unit_iop(floats(ori.ImageOrientationPatient)), (ps[0], ps[1]), rows, cols,
                               fs, fi, photometric, pad, lossy, _rescale_stated(pvt),
                               real_world_lines(rwvm, ds, fs, fi)))
        return out
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        return []
    ipp, iop, ps = floats(ds.ImagePositionPatient), unit_iop(floats(ds.ImageOrientationPatient)), floats(ds.PixelSpacing)
    slope, icpt = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if "MOSAIC" not in [str(v).upper() for v in ds.get("ImageType") or []]:
        return [InImage(path, sop, series, 0, -1, ipp, iop, (ps[0], ps[1]), rows, cols, slope, icpt, photometric,
                        pad, lossy, _rescale_stated(ds),
                        real_world_lines(ds.get("RealWorldValueMappingSequence"), ds, slope, icpt),
                        (_text(ds.get("ConvolutionKernel")), _agent(ds.get("ContrastBolusAgent"))))]
    n = _images_in_mosaic(ds) or 0
    centres = _ascconv_positions(ds, n) if n else None
    if not n or centres is None:
        return []  # cannot be placed: stays uncovered unless reported
    grid = math.ceil(math.sqrt(n))
    r, c = rows // grid, cols // grid
    first = ipp + iop[3:] * ps[0] * (rows - r) / 2 + iop[:3] * ps[1] * (cols - c) / 2
    centres = _tile_order(centres, first, np.cross(iop[:3], iop[3:]))
    return [InImage(path, sop, series, 0, k, first + centres[k] - centres[0], iop, (ps[0], ps[1]), r, c, slope,
                    icpt, photometric, pad, lossy) for k in range(n)]


def read_inputs(in_dir: Path) -> list[InImage]:
    """Every image under ``in_dir``, once per SOPInstanceUID (+ frame, tile) as the node keeps an instance once;
    non-DICOM and non-image files are left out."""
    out: list[InImage] = []
    seen: set[tuple[str, int, int]] = set()
    for p in sorted(in_dir.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name == "report.json":
            continue
        try:
            ds = read_dicom(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        if "Rows" not in ds or "Columns" not in ds:
            continue
        try:
            images = _read_input(p, ds)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            continue
        declares = tuple(str(ds.get(k, "") or "").strip() for k in ("ImagesInAcquisition", "NumberOfFrames",
                                                                     "AcquisitionNumber"))
        for x in images:
            x.declares = (declares[0], declares[1], declares[2])
            key = (x.sop, x.frame, x.tile)
            if not x.sop or key not in seen:
                seen.add(key)
                out.append(x)
    return out


def declared_instances(images: Sequence[InImage]) -> int:
    """How many instances the images of one series declare it holds: ImagesInAcquisition (/ NumberOfFrames of a
    multi-frame object) when every image states the same ImagesInAcquisition, NumberOfFrames and AcquisitionNumber
    (one acquisition: the count is of that acquisition's images); 0 when they do not, or none states it."""
    said = {x.declares for x in images}
    if len(said) != 1:
        return 0
    images_in, frames, _ = said.pop()
    if not images_in.isdigit() or int(images_in) <= 0:
        return 0
    n_frames = int(frames) if frames.isdigit() and int(frames) > 0 else 1
    return int(images_in) // n_frames if int(images_in) % n_frames == 0 else 0


@dataclass
class OutImage:
    file: Path
    ds: Dataset  # header only
    refs: list[tuple[str, int]]  # (SOPInstanceUID, frame number or 0) of SourceImageSequence (a multi-frame
    # object: of each frame's DerivationImageSequence, frame by frame)

    @property
    def ipp(self) -> np.ndarray:
        return floats(self.ds.ImagePositionPatient)

    @property
    def iop(self) -> np.ndarray:
        return unit_iop(floats(self.ds.ImageOrientationPatient))


def read_outputs(out_dir: Path) -> tuple[dict[str, list[OutImage]], dict[str, list[OutImage]]]:
    """(derived image series, uncertainty series: Parametric Maps and Secondary Captures), each
    SeriesInstanceUID -> images. Files are read by content, whatever their name (``srnode process`` writes
    ``IM00001.dcm``, a dcmtk storescp ``CT.<uid>`` / ``PM.<uid>``); non-DICOM files are left out."""
    derived: dict[str, list[OutImage]] = {}
    sc: dict[str, list[OutImage]] = {}
    for p in sorted(out_dir.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name == "report.json":
            continue
        try:
            ds = read_dicom(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        if "SeriesInstanceUID" not in ds:
            continue
        items = list(ds.get("SourceImageSequence") or [])
        for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
            for der in frame.get("DerivationImageSequence") or []:
                items.extend(der.get("SourceImageSequence") or [])
        refs = [(str(it.get("ReferencedSOPInstanceUID", "")), int(it.get("ReferencedFrameNumber", 0) or 0))
                for it in items]
        img = OutImage(p, ds, refs)
        target = sc if str(ds.get("SOPClassUID", "")) in SIGMA_CLASSES else derived
        target.setdefault(str(ds.SeriesInstanceUID), []).append(img)
    return derived, sc


class Pixels:
    """Modality values of input and output images, decoded once per file (NaN where input padding)."""

    def __init__(self) -> None:
        self._arrays: dict[Path, np.ndarray] = {}

    def _array(self, path: Path) -> np.ndarray:
        if path not in self._arrays:
            if len(self._arrays) > 64:
                self._arrays.clear()
            self._arrays[path] = np.asarray(read_dicom(path).pixel_array)
        return self._arrays[path]

    def of_input(self, img: InImage) -> np.ndarray:
        arr = self._array(img.file)
        if img.frame:
            stored = arr[img.frame - 1]
        elif img.tile >= 0:
            grid = arr.shape[0] // img.rows
            gr, gc = divmod(img.tile, grid)
            stored = arr[gr * img.rows:(gr + 1) * img.rows, gc * img.cols:(gc + 1) * img.cols]
        else:
            stored = arr
        vals = stored.astype(np.float64) * img.slope + img.intercept
        if img.padding is not None:
            vals[(stored >= img.padding[0]) & (stored <= img.padding[1])] = np.nan
        return vals  # type: ignore[no-any-return]

    def of_output(self, img: OutImage) -> np.ndarray:
        ds = img.ds
        slope, icpt = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        return self._array(img.file).astype(np.float64) * slope + icpt  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- checking
