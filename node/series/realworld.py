"""Real-world value mappings an input image states, as linear maps of its modality values.

A quantitative reader takes an image's values through a Real World Value Mapping (PS3.3 C.7.6.16.2.11, the
RealWorldValueMappingSequence (0040,9096): at the top level of a single-frame image, in a frame's functional
groups of an enhanced object), or, for Philips MR, through the private ScaleSlope (2005,100E) of the creator
"Philips MR Imaging DD 001" (top level, or in a frame's private group (2005,140F)): the "precise float"
FP = (SV * RS + RI) / (RS * SS) of dcm2niix and nibabel (SV stored value, RS / RI the rescale, SS the scale slope;
the private ScaleIntercept (2005,100D) is not part of that rule). The derived series copies no private element and
has its own rescale, so each mapping is read here as ``real = a * modality + c`` (modality = SV * RS + RI, the values
srnode derives) and restated by ``node.derived`` in the derived series' own stored units.

A mapping given as a lookup table (RealWorldValueLUTData), or piecewise (several linear items over different ranges
of stored values), cannot be restated as lines over the derived series' values: ``RealWorld.linear`` False, and
the derived series says it was not carried (``RealWorld.not_restated``).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.errors import VolumeError

PHILIPS_CREATOR = "Philips MR Imaging DD 001"
PHILIPS_FRAME_CREATOR = "Philips MR Imaging DD 005"  # its (2005,140F) per-frame private sequence
PHILIPS_LABEL = "PHILIPS_FP"
PHILIPS_EXPLANATION = "Philips precise value FP = (SV*RS+RI)/(RS*SS), SS (2005,100E)"
NO_UNITS = ("1", "UCUM", "no units")
REL_TOL = 1e-6  # two mappings whose a and c agree to this are one (DS strings keep 16 characters)


@dataclass(frozen=True)
class RealWorld:
    """One mapping of modality values to real-world values: ``real = a * modality + c`` (``linear``), labelled
    ``label`` (LUTLabel, SH), ``explanation`` (LUTExplanation, LO) and ``units`` (code value, scheme, meaning of
    MeasurementUnitsCodeSequence). ``source``: "standard" (a RealWorldValueMappingSequence item) or "philips"."""

    label: str
    explanation: str
    units: tuple[str, str, str]
    a: float
    c: float
    source: str
    linear: bool = True
    # why a mapping that is not ``linear`` cannot be restated (the derived series' note says it)
    not_restated: str = "given as a lookup table"

    def same(self, other: RealWorld) -> bool:
        """Whether ``other`` is the same mapping (labels, units, kind, and a / c within ``REL_TOL``)."""
        def close(x: float, y: float) -> bool:
            return math.isclose(x, y, rel_tol=REL_TOL, abs_tol=REL_TOL * max(abs(self.a), abs(other.a), 1e-30))
        return (self.label, self.units, self.source, self.linear) == \
            (other.label, other.units, other.source, other.linear) and \
            (not self.linear or (close(self.a, other.a) and close(self.c, other.c)))


def _float(value: Any) -> float | None:
    """A numeric value as a float: a number, a DS string, the first of several, or 4 / 8 bytes of a private
    element read without its VR (implicit VR, FL / FD little endian); None when it is none of these."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 4:
            return float(struct.unpack("<f", value)[0])
        if len(value) == 8:
            return float(struct.unpack("<d", value)[0])
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return _float(value[0]) if len(value) else None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out


def _units(item: Dataset) -> tuple[str, str, str]:
    seq = item.get("MeasurementUnitsCodeSequence") or []
    if not seq:
        return NO_UNITS
    code = seq[0]
    return (str(code.get("CodeValue", "") or code.get("LongCodeValue", "") or ""),
            str(code.get("CodingSchemeDesignator", "") or ""), str(code.get("CodeMeaning", "") or ""))


def _standard(items: Any, slope: float, intercept: float, where: str) -> list[RealWorld]:
    """The mappings of RealWorldValueMappingSequence ``items``, each as a line of modality values (the image's
    rescale ``slope`` / ``intercept``: the items map stored values)."""
    out = []
    for item in items or []:
        m, b = _float(item.get("RealWorldValueSlope")), _float(item.get("RealWorldValueIntercept"))
        label = str(item.get("LUTLabel", "") or "")[:16]
        explanation = str(item.get("LUTExplanation", "") or "")[:64]
        if m is None or b is None:  # a lookup table (or nothing usable): not a line
            out.append(RealWorld(label, explanation, _units(item), 0.0, 0.0, "standard", linear=False))
            continue
        if not (math.isfinite(m) and math.isfinite(b)):
            raise VolumeError(f"{where}: its RealWorldValueSlope / Intercept are not finite numbers; its real-world "
                              "values cannot be restated; not super-resolved")
        # real = stored * m + b, stored = (modality - intercept) / slope
        out.append(RealWorld(label, explanation, _units(item), m / slope, b - intercept * m / slope, "standard"))
    ranges = {_mapped_range(item) for item, rw in zip(items or [], out, strict=True) if rw.linear}
    if len(ranges) > 1:  # a piecewise mapping: restated over the whole stored range, each piece would be wrong
        out = [dataclasses.replace(rw, linear=False, a=0.0, c=0.0, not_restated=PIECEWISE) if rw.linear else rw
               for rw in out]
    return out


PIECEWISE = "given piecewise (items over different ranges of stored values)"


def _mapped_range(item: Dataset) -> tuple[object, object]:
    """(RealWorldValueFirstValueMapped, RealWorldValueLastValueMapped) of a mapping item as read (US / SS: raw
    bytes where the VR was not known): the range of stored values it maps (PS3.3 C.7.6.16.2.11.1.1). Several items
    over different ranges are pieces of one mapping (review18: two pieces, 0-2000 x1 and 2001-4095 x3, were both
    restated as lines over every derived value: half the range read 3x off)."""
    def raw(value: object) -> object:
        return bytes(value) if isinstance(value, (bytes, bytearray)) else str(value)
    return raw(item.get("RealWorldValueFirstValueMapped")), raw(item.get("RealWorldValueLastValueMapped"))


def _philips_scale(item: Dataset | None) -> float | None:
    """Philips' private ScaleSlope (2005,100E) in ``item`` (under its private creator), None when absent."""
    if item is None:
        return None
    try:
        block = item.private_block(0x2005, PHILIPS_CREATOR)
    except KeyError:
        return None
    if 0x0E not in block:
        return None
    return _float(block[0x0E].value)


def _philips_frame_item(ds: Dataset, frame: int) -> Dataset | None:
    """The first item of the frame's Philips private per-frame sequence (2005,140F), None when absent."""
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if groups is None or len(groups) <= frame:
        return None
    try:
        block = groups[frame].private_block(0x2005, PHILIPS_FRAME_CREATOR)
    except KeyError:
        return None
    if 0x0F not in block:
        return None
    seq = block[0x0F].value
    return seq[0] if isinstance(seq, (list, Sequence)) and len(seq) else None


def real_world_of(ds: Dataset, frame: int, slope: float, intercept: float, where: str) -> tuple[RealWorld, ...]:
    """The real-world mappings image ``ds`` (frame ``frame`` of a multi-frame object, -1 single-frame) states, as
    lines of its modality values (its rescale ``slope`` / ``intercept``). The standard mapping wins; the Philips
    ScaleSlope is read only when the image states none. VolumeError naming ``where`` when a stated ScaleSlope is
    0 or not a finite number (its FP values are not defined)."""
    if frame >= 0:  # the frame's functional group, else the shared one; then Philips' private per-frame group
        items: Any = None
        for name, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
            g = ds.get(name)
            if g is not None and len(g) > idx and "RealWorldValueMappingSequence" in g[idx]:
                items = g[idx].RealWorldValueMappingSequence
                break
        philips_item = _philips_frame_item(ds, frame)
    else:
        items = ds.get("RealWorldValueMappingSequence")
        philips_item = ds
    found = _standard(items, slope, intercept, where)
    if found:
        return tuple(found)
    ss = _philips_scale(philips_item)
    if ss is None and frame >= 0:
        ss = _philips_scale(ds)
    if ss is None:
        return ()
    if not math.isfinite(ss) or ss == 0:
        raise VolumeError(f"{where}: its Philips ScaleSlope (2005,100E) is {ss:g}: its precise (FP) values are not "
                          "defined; not super-resolved")
    # FP = (SV * RS + RI) / (RS * SS) = modality / (RS * SS)
    return (RealWorld(PHILIPS_LABEL, PHILIPS_EXPLANATION, NO_UNITS, 1.0 / (slope * ss), 0.0, "philips"),)


def one_mapping(per_slice: list[tuple[RealWorld, ...]], names: list[str], name: str) -> tuple[RealWorld, ...]:
    """The mappings every slice of one volume states alike; VolumeError naming the images of each group when they
    differ (a ScaleSlope of one slice beside another of the next: one derived value would stand for two real
    values; the engine would mix them), never a value."""
    groups: list[tuple[tuple[RealWorld, ...], list[str]]] = []
    for maps, where in zip(per_slice, names, strict=True):
        for key, members in groups:
            if len(key) == len(maps) and all(x.same(y) for x, y in zip(key, maps, strict=True)):
                members.append(where)
                break
        else:
            groups.append((maps, [where]))
    if len(groups) > 1:
        said = "; ".join(f"{len(m)} image(s) ({', '.join(sorted(m)[:5])}{', ...' if len(m) > 5 else ''})"
                         for _, m in sorted(groups, key=lambda g: (-len(g[1]), min(g[1]))))
        raise VolumeError(f"{name}: its images state {len(groups)} different real-world value mappings (Real World "
                          "Value Mapping, or Philips ScaleSlope (2005,100E), relative to their rescale): "
                          f"{said}; their values mean different real-world values and cannot be stacked into one "
                          "volume")
    return groups[0][0] if groups else ()
