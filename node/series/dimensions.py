"""The standard dimensions that tell the volumes of one series apart, read per image (classic attributes, or the
frame's functional groups for enhanced objects), with their labels ("echo 2 TE 12.46", "time 3", "type P"):
image type, echo, diffusion b-value and direction, temporal position, trigger time, acquisition number,
enhanced dimension index, stack. Used by ``node.series.split``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.series.mosaic import SIEMENS_MR_HEADER
from node.series.slices import Slice, frame_group_item

# numeric dimension values within this (absolute, in the attribute's unit) count as one value
VALUE_TOL = 1e-3


def _frame_value(s: Slice, seq: str, keyword: str) -> Any:
    """``keyword`` inside functional group ``seq`` of the slice's frame (enhanced objects only), else None."""
    if s.frame < 0:
        return None
    item = frame_group_item(s.header, seq, s.frame)
    return item.get(keyword) if item is not None else None


def _present(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, (list, tuple)) and len(value) == 0)


def _first(value: Any) -> Any:
    """The first value of a multi-valued attribute (a single value as it is)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    seq = list(value)
    return seq[0] if seq else None


def _num(value: Any) -> float | None:
    try:
        v = float(_first(value))
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _nums(value: Any) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if out and all(np.isfinite(out)) else None


def _siemens(ds: Dataset, offset: int) -> Any:
    try:
        return ds.private_block(0x0019, SIEMENS_MR_HEADER)[offset].value
    except (KeyError, ValueError):
        return None


_UNPACK = {"FL": "f", "FD": "d", "SS": "h", "US": "H", "SL": "l", "UL": "L"}


def _private(ds: Dataset, group: int, creator: str, offset: int, vr: str) -> Any:
    """A vendor's private element (``creator``'s block of ``group``) as its values, or None when absent or
    unreadable. ``vr``: the element's VR, for bytes read without one (implicit VR, or UN): IS / DS as text, binary
    numbers little-endian, as the vendors write them."""
    try:
        elem = ds.private_block(group, creator)[offset]
    except (KeyError, ValueError):
        return None
    value = elem.value
    if not isinstance(value, bytes):
        return value
    try:
        if vr in ("IS", "DS"):
            return [v.strip() for v in value.decode("ascii").strip("\x00 ").split("\\")]
        size = struct.calcsize("<" + _UNPACK[vr])
        return list(struct.unpack(f"<{len(value) // size}{_UNPACK[vr]}", value[: len(value) // size * size]))
    except (UnicodeDecodeError, KeyError, struct.error):
        return None


# GE: (0043,1039) "slop int 6..9", its first value the b-value (10^9 added to each in a multi-b scan),
# (0019,10BB..BD) the gradient direction; (0043,102F) the image component (0 magnitude, 1 phase, 2 real,
# 3 imaginary). Philips: (2001,1003) the b-value, (2005,10B0..B2) the gradient direction.
GE_PARM, GE_ACQU = "GEMS_PARM_01", "GEMS_ACQU_01"
PHILIPS_IMAGING, PHILIPS_MR = "Philips Imaging DD 001", "Philips MR Imaging DD 001"
_GE_COMPONENT = {0: "M", 1: "P", 2: "R", 3: "I"}


def _ge_diffusion(ds: Dataset) -> bool:
    """Whether a GE image may be a diffusion image, so that (0043,1039) is a b-value: GE writes that element on
    every MR image (the shared GE 3D T1: 0\\1073741824\\0\\0), a b-value only in diffusion scans, which are EPI
    (ScanningSequence EP) and state their number of directions in (0019,10E0)."""
    directions = _num(_private(ds, 0x0019, GE_ACQU, 0xE0, "DS"))
    sequence = ds.get("ScanningSequence")
    seqs = [sequence] if sequence is None or isinstance(sequence, str) else list(sequence)
    return bool(directions and directions > 0) or "EP" in [str(v).upper() for v in seqs]


def _vendor_diffusion(ds: Dataset) -> tuple[Any, Any]:
    """(b-value, gradient direction) from GE's or Philips' private elements, (None, None) when neither states one."""
    b = _private(ds, 0x0043, GE_PARM, 0x39, "IS") if _ge_diffusion(ds) else None
    if _present(b):
        bv = _num(b)
        if bv is not None and bv >= 1e9:
            bv = bv % 1e9
        g = [_private(ds, 0x0019, GE_ACQU, o, "DS") for o in (0xBB, 0xBC, 0xBD)]
        return bv, [_first(v) for v in g] if all(_present(v) for v in g) else None
    b = _private(ds, 0x2001, PHILIPS_IMAGING, 0x03, "FL")
    if _present(b):
        g = [_private(ds, 0x2005, PHILIPS_MR, o, "FL") for o in (0xB0, 0xB1, 0xB2)]
        return _first(b), [_first(v) for v in g] if all(_present(v) for v in g) else None
    return None, None


# ---------------------------------------------------------------------------------------------- dimensions


def _image_type(s: Slice) -> Hashable:
    if s.frame >= 0:
        for seq in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence"):
            ft = _frame_value(s, seq, "FrameType")
            if _present(ft):
                comp = _frame_value(s, seq, "ComplexImageComponent")
                return tuple(str(v).upper() for v in ft) + ((str(comp).upper(),) if _present(comp) else ())
    it = s.header.get("ImageType")
    stated = tuple(str(v).upper() for v in it) if _present(it) else None
    component = _num(_private(s.header, 0x0043, GE_PARM, 0x2F, "SS")) if s.frame < 0 else None
    if component is not None and int(component) in _GE_COMPONENT:  # GE keeps one ImageType for M, P, R and I
        return (stated or ()) + (_GE_COMPONENT[int(component)],)
    if stated is not None and s.frame < 0 and _ge_mr(s.header):
        # a GE MR image without its component (private elements removed from some instances on their way): the
        # component is unknown, not another kind; the image takes the one its series' other images state
        # (``parts_may_be_absent``; with magnitude and phase both stated, which one cannot be told: refused)
        return stated + (None,)
    return stated


def _ge_mr(ds: Dataset) -> bool:
    """Whether ``ds`` is a GE MR image (whose image component (0043,102F) is M, P, R or I when stated)."""
    return (str(ds.get("Modality", "") or "").strip().upper() == "MR"
            and str(ds.get("Manufacturer", "") or "").strip().upper().split(" ")[0] in ("GE", "GEMS"))


# ImageType values past the third that name a kind of image (not a vendor's flag): complex components (PS3.3
# C.8.13.1.1.1 value 4; ComplexImageComponent), Dixon water / fat / in / opposed phase, Siemens intensity
# normalisation, motion correction and distortion correction, projections and reformats
KIND_VALUES = frozenset({"M", "P", "R", "I", "MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "MIXED",
                         "W", "F", "WATER", "FAT", "IN_PHASE", "OUT_PHASE", "OPP_PHASE", "IP", "OP",
                         "NORM", "MOCO", "DIS2D", "DIS3D", "MIP", "MINIP", "MPR", "PROJECTION IMAGE", "SUBTRACTION"})


def _image_kind(s: Slice) -> Hashable:
    """The kind of image ImageType (FrameType + ComplexImageComponent) names: its first three values (ORIGINAL /
    DERIVED, PRIMARY / SECONDARY, the modality's kind: AXIAL, LOCALIZER, M, P, MIP, ...) and those of the later
    values in ``KIND_VALUES``; the other later values are vendors' flags that may change within one stack (GE
    writes ORIGINAL\\PRIMARY\\AXIAL\\ADD on some slices of one CT stack, ORIGINAL\\PRIMARY\\AXIAL on the others)."""
    full = _image_type(s)
    if not isinstance(full, tuple):
        return full
    return full[:3] + tuple(v for v in full[3:] if v in KIND_VALUES or v is None)  # None: a GE component unknown


def _echo(s: Slice) -> Hashable:
    number = s.header.get("EchoNumbers")
    te = _frame_value(s, "MREchoSequence", "EffectiveEchoTime") if s.frame >= 0 else None
    if not _present(te):
        te = s.header.get("EchoTime")
    n = _num(number) if _present(number) else None
    t = _num(te) if _present(te) else None
    return None if n is None and t is None else (n, t)


def _diffusion(s: Slice) -> Hashable:
    b: Any = None
    g: Any = None
    if s.frame >= 0:
        b = _frame_value(s, "MRDiffusionSequence", "DiffusionBValue")
        item = frame_group_item(s.header, "MRDiffusionSequence", s.frame)
        seq = item.get("DiffusionGradientDirectionSequence") if item is not None else None
        if seq:
            g = seq[0].get("DiffusionGradientOrientation")
    if not _present(b):
        b = s.header.get("DiffusionBValue")
        g = s.header.get("DiffusionGradientOrientation")
        if not _present(b) and s.header.get("MRDiffusionSequence"):
            item = s.header.MRDiffusionSequence[0]
            b = item.get("DiffusionBValue")
            seq = item.get("DiffusionGradientDirectionSequence")
            g = seq[0].get("DiffusionGradientOrientation") if seq else None
    if not _present(b):
        b, g = _siemens(s.header, 0x0C), _siemens(s.header, 0x0E)
    if not _present(b):
        b, g = _vendor_diffusion(s.header)
    bv = _num(b) if _present(b) else None
    if bv is None:
        return None
    gv = _nums(g) if _present(g) else None
    return (bv, gv)


def _temporal(s: Slice) -> Hashable:
    v = _frame_value(s, "FrameContentSequence", "TemporalPositionIndex") if s.frame >= 0 else None
    if not _present(v):
        v = s.header.get("TemporalPositionIdentifier")
    return _num(v) if _present(v) else None


def _trigger(s: Slice) -> Hashable:
    v = _frame_value(s, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime") if s.frame >= 0 else None
    if not _present(v):
        v = s.header.get("TriggerTime")
    return _num(v) if _present(v) else None


def _acquisition(s: Slice) -> Hashable:
    v = s.header.get("AcquisitionNumber")
    return _num(v) if _present(v) else None


_POSITION_POINTERS = {Tag("InStackPositionNumber"), Tag("ImagePositionPatient"), Tag("StackID")}


def _dimension_index(s: Slice) -> Hashable:
    values = _frame_value(s, "FrameContentSequence", "DimensionIndexValues")
    dims = s.header.get("DimensionIndexSequence")
    if not _present(values) or not dims:
        return None
    values = [values] if isinstance(values, int) else list(values)
    keep = [int(v) for d, v in zip(dims, values, strict=False)
            if Tag(d.get("DimensionIndexPointer", 0)) not in _POSITION_POINTERS]
    return tuple(keep) if keep else None


def _stack(s: Slice) -> Hashable:
    v = _frame_value(s, "FrameContentSequence", "StackID")
    return str(v) if _present(v) else None


NO_CONTRAST = "none"


def _contrast(s: Slice) -> Hashable:
    """Whether, and which, contrast agent the image was acquired with: ContrastBolusAgent (PS3.3 C.7.6.4, Type 2;
    an enhanced object's frame: its Contrast/Bolus Usage functional group, ContrastBolusAgentAdministered YES) as
    printable ASCII without backslash, runs of spaces as one, upper case, at most 32 characters (it labels a
    volume); ``NO_CONTRAST`` when it states none (the module absent or empty, as a pre-contrast image writes it, or
    the words NONE / NO): never None, so that an image without contrast is never taken as one with it
    (``split._column`` fills an absent value with the one value stated)."""
    v = s.header.get("ContrastBolusAgent")
    if not _present(v) and s.frame >= 0:
        usage = frame_group_item(s.header, "ContrastBolusUsageSequence", s.frame)
        if usage is not None and str(usage.get("ContrastBolusAgentAdministered", "") or "").upper() == "YES":
            v = "administered"
    if not _present(v):
        return NO_CONTRAST
    # free text typed at the console (LO): case and runs of spaces say nothing about the agent ("Omnipaque 350" and
    # "OMNIPAQUE  350" on the slices of one acquisition were two volumes at twice the step: review18)
    text = " ".join("".join(c for c in str(_first(v)) if " " <= c <= "~" and c != "\\").split()).upper()[:32]
    return NO_CONTRAST if text in ("", "NONE", "NO") else text


def _kernel(s: Slice) -> Hashable:
    """The CT reconstruction kernel (ConvolutionKernel, PS3.3 C.8.2.1; an enhanced CT's in its CT Reconstruction
    functional group), all its values as one text joined by '/' (Siemens writes two: 'Br40d/3'), printable ASCII
    but the backslash only, at most 32 characters (it labels a volume: SeriesDescription); None when absent."""
    v = s.header.get("ConvolutionKernel")
    if not _present(v):
        v = _frame_value(s, "CTReconstructionSequence", "ConvolutionKernel")
    if not _present(v):
        return None
    parts = [v] if isinstance(v, (str, bytes)) else list(v)
    text = "/".join(str(x).strip() for x in parts)  # never a backslash: labels go into SeriesDescription (LO)
    text = "".join(c for c in text if " " <= c <= "~" and c != "\\")[:32].strip()
    return text or None


@dataclass(frozen=True)
class Dimension:
    """One way images of a series can differ, its value per image and a reader's label per value."""

    name: str
    key: Callable[[Slice], Hashable]
    label: Callable[[Any, list[Any]], str]  # (this volume's value, every volume's value) -> "echo 2"
    attributes: str = ""  # the attributes it is read from, for messages: "EchoNumbers / EchoTime"
    # whether a None inside a tuple value is an absent attribute (an echo without EchoNumbers: the value is
    # unknown, not another value); False where None is a value of its own (a b-value without gradient direction)
    parts_may_be_absent: bool = False

    def of(self, s: Slice) -> Hashable:
        """This dimension's value of slice ``s`` (``key``, read from its header or as taken from it:
        ``Slice.value``)."""
        return s.value(self.reader[0], self.reader[1])  # type: ignore[no-any-return]

    @property
    def reader(self) -> tuple[str, Callable[[Slice], Any]]:
        """(key, how) of this dimension's value, for ``Slice.take``."""
        return f"dimension {self.name}", self.key


def _rank(value: Any, values: list[Any]) -> int:
    uniq = sorted({v for v in values if v is not None}, key=order)
    return uniq.index(value) + 1 if value in uniq else 0


def _type_label(value: Any, values: list[Any]) -> str:
    if value is None:
        return "type none"
    others = [v for v in values if v is not None and v != value]
    differing = [c for i, c in enumerate(value) if any(i >= len(o) or o[i] != c for o in others)]
    return "type " + "/".join(str(c) if c is not None else "?" for c in (differing or value))


def _echo_label(value: Any, values: list[Any]) -> str:
    if value is None:
        return "no echo number"
    n, te = value
    numbers = {v[0] for v in values if v is not None}
    if n is not None and len(numbers) == len({v for v in values if v is not None}):
        return f"echo {n:g}"
    return f"echo {_rank(value, values)}" + (f" TE {te:g}" if te is not None else "")


def _diffusion_label(value: Any, values: list[Any]) -> str:
    if value is None:
        return "no b-value"
    b, g = value
    same_b = [v for v in values if v is not None and v[0] == b]
    if len({v[1] for v in same_b}) > 1:
        return f"b={b:g} dir {_rank(value, same_b)}"
    return f"b={b:g}"


def _simple(prefix: str, unit: str = "", absent: str = "") -> Callable[[Any, list[Any]], str]:
    """Labels "<prefix> <value><unit>"; ``absent``: the label of the images that state no value (never "?":
    a reader is told what is missing, series14)."""
    def label(value: Any, values: list[Any]) -> str:
        if value is None:
            return absent or f"no {prefix}"
        return f"{prefix} {value:g}{unit}" if isinstance(value, float) else f"{prefix} {value}"
    return label


def _index_label(value: Any, values: list[Any]) -> str:
    return "no DimensionIndexValues" if value is None else "index " + ".".join(str(v) for v in value)


# in order of preference when two explain the repeats equally well
DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("image type", _image_type, _type_label, "ImageType (FrameType) / GE's image component (0043,102F)",
              parts_may_be_absent=True),
    Dimension("echo", _echo, _echo_label, "EchoNumbers / EchoTime (EffectiveEchoTime)", parts_may_be_absent=True),
    Dimension("diffusion b-value/direction", _diffusion, _diffusion_label, "DiffusionBValue"),
    Dimension("temporal position", _temporal, _simple("time", absent="no temporal position"),
              "TemporalPositionIdentifier (TemporalPositionIndex)"),
    Dimension("trigger time", _trigger, _simple("trigger", " ms", "no trigger time"), "TriggerTime (NominalCardiacTriggerDelayTime)"),
    Dimension("acquisition number", _acquisition, _simple("acquisition", absent="no AcquisitionNumber"),
              "AcquisitionNumber"),
    Dimension("dimension index", _dimension_index, _index_label, "DimensionIndexValues"),
    # two reconstructions of one acquisition (a soft-tissue and a bone kernel) under one SeriesInstanceUID: at the
    # same positions they were refused as repeats nothing tells apart; offset by half a step, stacked into one
    # volume alternating kernel slice by slice (field17)
    Dimension("reconstruction kernel", _kernel, _simple("kernel", absent="no ConvolutionKernel"),
              "ConvolutionKernel"),
    # images acquired without and with a contrast agent (a pre- and a post-contrast pass) under one
    # SeriesInstanceUID: at positions offset by a fraction of the step they stacked into one volume alternating
    # contrast slice by slice, exit 0 (field18); at the same positions, refused as repeats nothing tells apart
    Dimension("contrast agent", _contrast, _simple("contrast"), "ContrastBolusAgent (Contrast/Bolus Usage)"),
)
# the image type in the values that name a kind of image: images of two kinds are two volumes even where they repeat
# no position (``node.series.split``)
IMAGE_KIND = Dimension("image kind", _image_kind, _type_label,
                       "ImageType (FrameType) / GE's image component (0043,102F)", parts_may_be_absent=True)
STACK = Dimension("stack", _stack, _simple("stack", absent="no StackID"), "StackID")


# ---------------------------------------------------------------------------------------------- values


def order(v: Any) -> tuple[Any, ...]:
    """Sort key of a dimension value (None last; numbers by value, the rest by text)."""
    if v is None:
        return (2,)
    if isinstance(v, (int, float)):
        return (0, float(v))
    if isinstance(v, tuple):
        return (1, tuple(order(x) for x in v))
    return (1, ((1, str(v)),))


def _close(a: Any, b: Any) -> bool:
    """Equal, numbers within VALUE_TOL (tuples element by element)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= VALUE_TOL
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def is_partial(dim: Dimension, value: Any) -> bool:
    """Whether ``value`` of ``dim`` says less than a whole value: None (the attribute absent), or, for a dimension
    whose tuple parts may be absent (echo: number, time), a tuple with a None part."""
    if value is None:
        return True
    return dim.parts_may_be_absent and isinstance(value, tuple) and any(v is None for v in value)


def consistent(partial: Any, whole: Any) -> bool:
    """Whether a partial value (``is_partial``) may be ``whole``: None fits every value; a tuple fits a tuple of
    the same length whose parts it states are close (numbers within VALUE_TOL)."""
    if partial is None:
        return True
    if isinstance(partial, tuple) and isinstance(whole, tuple) and len(partial) == len(whole):
        return all(p is None or _close(p, w) for p, w in zip(partial, whole, strict=True))
    return False


def canonical(values: Sequence[Any]) -> list[Any]:
    """``values`` with each replaced by the first earlier value it is close to (numbers within VALUE_TOL)."""
    reps: list[Any] = []
    out = []
    for v in values:
        for r in reps:
            if _close(r, v):
                out.append(r)
                break
        else:
            reps.append(v)
            out.append(v)
    return out


# ---------------------------------------------------------------------------------------------- positions
