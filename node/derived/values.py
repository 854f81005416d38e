"""Stored values of the derived series: one output rescale that holds every value, and the conversion to it.

The input may carry a different RescaleSlope / Intercept, BitsStored or PixelRepresentation per slice (Philips MR
scales each slice to its own maximum; some CT is saved with each slice's bit depth). The derived series gets one
format for all its slices, chosen so that every value of every input slice and of the engine's result is held
(never clipped):

- every input slice shares one rescale: that rescale is kept (stored values at acquired positions then equal the
  input's exactly), with BitsStored / PixelRepresentation widened just enough for the whole range (<= 16 bits);
- otherwise (or when 16 bits at the shared rescale cannot hold the range): unsigned 16 bits, intercept 0 (or the
  floor of the lowest value when it is negative) and slope = range / 65534, so every modality value is held within
  +-slope/2 (the stored-value rounding), whatever the slope of the slice it came from.

The slope and intercept are returned as the numbers their DS strings read back as, so that the stored values are
computed with exactly what a reader will apply.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import format_number_as_ds

from node.errors import DeriveError
from node.series import MAX_MODALITY_ABS, RealWorld, SeriesVolume, StoredFormat

MAX_BITS = 16  # CT and MR Image IODs: BitsAllocated 16
CT_MIN_BITS = 12  # CT Image IOD: BitsStored 12 to 16 (PS3.3 C.8.2.1.1.4)


def ds_value(x: float) -> float:
    """``x`` as it reads back from its DS string (at most 16 characters)."""
    return float(format_number_as_ds(float(x)))


def _bits_for(lo: int, hi: int, signed: bool) -> int:
    """Fewest bits holding the stored integers lo..hi (two's complement when ``signed``)."""
    bits = 1
    while True:
        rlo, rhi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if rlo <= lo and hi <= rhi:
            return bits
        bits += 1


def output_format(vol: SeriesVolume, data: np.ndarray, min_bits: int = 1) -> tuple[StoredFormat, str]:
    """The one stored format of the derived series and a remark ("" when the input's format is kept as it was).

    ``min_bits``: the fewest BitsStored the derived objects' IOD allows (12 for the CT Image IOD, PS3.3
    C.8.2.1.1.4: Bits Stored 12 to 16; an 8-bit CT input was written with BitsStored 8, which dciodvfy rejects).

    ``data``: the engine's output, modality units (any shape). Raises DeriveError when it holds NaN or infinity
    (nothing is written that the engine did not compute) or values beyond ``MAX_MODALITY_ABS`` in magnitude
    (no rescale, window or validator holds them: refused, never written out of range).
    """
    # reductions only (min and max propagate NaN and show infinities): no temporary as large as the output, which
    # was the job's peak memory for a long series (issue #15 item 5: +160 MB for 5000 64² slices x2)
    dmin, dmax = (float(np.min(data)), float(np.max(data))) if data.size else (0.0, 0.0)
    if not (math.isfinite(dmin) and math.isfinite(dmax)):
        raise DeriveError(f"series {vol.series_uid}: the engine's output holds NaN or infinite values; "
                          "no derived series is written")
    if max(abs(dmin), abs(dmax)) > MAX_MODALITY_ABS:
        raise DeriveError(f"series {vol.series_uid}: the engine's output reaches {max(abs(dmin), abs(dmax)):.3g} "
                          f"in magnitude, beyond the {MAX_MODALITY_ABS:g} a derived series can hold; "
                          "no derived series is written")
    formats = vol.formats or [StoredFormat(vol.rescale_slope, vol.rescale_intercept,
                                           vol.datasets.record(0).bits_stored,
                                           bool(vol.datasets.record(0).pixel_representation))]
    lo = float(min(np.min(data, initial=np.inf), np.min(vol.data, initial=np.inf)))
    hi = float(max(np.max(data, initial=-np.inf), np.max(vol.data, initial=-np.inf)))
    rescales = {(f.slope, f.intercept) for f in formats}
    if len(rescales) == 1:
        slope, icpt = ds_value(formats[0].slope), ds_value(formats[0].intercept)
        if slope > 0:
            slo, shi = int(np.rint((lo - icpt) / slope)), int(np.rint((hi - icpt) / slope))
            signed = any(f.signed for f in formats) or slo < 0
            in_bits = max(f.bits_stored for f in formats)
            bits = max(min(in_bits, MAX_BITS), _bits_for(slo, shi, signed), min_bits)
            if bits <= MAX_BITS:
                fmt = StoredFormat(slope, icpt, bits, signed)
                changed = bits != in_bits or len({(f.bits_stored, f.signed) for f in formats}) > 1 or \
                    signed != formats[0].signed
                note = (f"stored as {bits} bits {'signed' if signed else 'unsigned'} (input: "
                        + ", ".join(sorted({f"{f.bits_stored} bits {'signed' if f.signed else 'unsigned'}"
                                            for f in formats})) + ") to hold every value") if changed else ""
                return fmt, note
    icpt = 0.0 if lo >= 0 else ds_value(math.floor(lo))
    slope = ds_value(max(hi - icpt, 1e-6) / (2**MAX_BITS - 2))
    while np.rint((hi - icpt) / slope) > 2**MAX_BITS - 1:  # DS rounding made the slope a hair too small
        slope = ds_value(slope * (1 + 1e-9))
    fmt = StoredFormat(slope, icpt, MAX_BITS, False)
    slopes = sorted(f.slope for f in formats)
    note = (f"input rescale varies between slices ({len(rescales)} different; slope {slopes[0]:.6g}..{slopes[-1]:.6g}); "
            f"derived series stored with one rescale, slope {format_number_as_ds(slope)} intercept "
            f"{format_number_as_ds(icpt)} (values within +-{slope / 2:.3g} of the engine output)")
    return fmt, note


def to_stored(values: np.ndarray, fmt: StoredFormat) -> np.ndarray:
    """Modality values (any shape) as stored integers of ``fmt`` (int16/uint16). DeriveError, never a silent clip,
    when a value falls outside the format (``output_format`` chose it to hold them all)."""
    stored = np.rint((values.astype(np.float64) - fmt.intercept) / fmt.slope)
    lo, hi = fmt.stored_range
    if stored.size and (stored.min() < lo or stored.max() > hi):
        raise DeriveError(f"derived values {stored.min() * fmt.slope + fmt.intercept:g}.."
                          f"{stored.max() * fmt.slope + fmt.intercept:g} fall outside the stored range "
                          f"{lo}..{hi}; not written")
    return stored.astype(np.int16 if fmt.signed else np.uint16)


def real_world_mapping(mappings: tuple[RealWorld, ...], fmt: StoredFormat) -> tuple[Sequence | None, str]:
    """The RealWorldValueMappingSequence of every derived slice (PS3.3 C.7.6.16.2.11.1: one item per mapping the
    input states, each restated for the derived stored values of ``fmt``: real = stored * slope + intercept over
    the whole stored range), and a one-line note for the job report ("" when the input states none). A mapping the
    input gives as a lookup table is not restated (the note says so): stored values other than the input's would
    need another table.

    A line ``real = a * modality + c`` (``node.series.realworld``) becomes, with modality = stored * S + I of
    ``fmt``, RealWorldValueSlope a * S and RealWorldValueIntercept a * I + c (FD: no DS rounding)."""
    if not mappings:
        return None, ""
    lo, hi = fmt.stored_range
    items, notes = [], []
    for m in mappings:
        if not m.linear:
            notes.append(f"real-world value mapping {m.label or '(unlabelled)'} {m.not_restated}: not "
                         "carried to the derived series")
            continue
        item = Dataset()
        vr = "SS" if fmt.signed else "US"  # US or SS: as the stored values (PS3.3 C.7.6.16.2.11.1.1)
        item.add_new(0x00409216, vr, int(lo))  # RealWorldValueFirstValueMapped
        item.add_new(0x00409211, vr, int(hi))  # RealWorldValueLastValueMapped
        item.RealWorldValueIntercept = float(m.a * fmt.intercept + m.c)
        item.RealWorldValueSlope = float(m.a * fmt.slope)
        item.LUTExplanation = m.explanation or m.label or "real-world values"
        item.LUTLabel = m.label or "RWV"
        units = Dataset()
        units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = m.units
        item.MeasurementUnitsCodeSequence = Sequence([units])
        items.append(item)
        what = ("Philips ScaleSlope (2005,100E)" if m.source == "philips" else f"real-world mapping {m.label}")
        notes.append(f"{what} of the input restated as RealWorldValueMappingSequence {item.LUTLabel} "
                     f"in the derived stored values (real = stored x {format_number_as_ds(item.RealWorldValueSlope)}"
                     f" + {format_number_as_ds(item.RealWorldValueIntercept)})")
    return (Sequence(items) if items else None), "; ".join(notes)
