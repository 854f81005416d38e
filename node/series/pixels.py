"""One image's pixels: its encoding checked and decoded (``decoded_pixels``), its stored-value format
(``stored_format``, ``representable_range``) and its modality values (``modality_values``: stored x its own
RescaleSlope + RescaleIntercept, NaN where PixelPaddingValue, bounded by ``check_range``). Per image; stacking,
measuring and the checks of a whole volume are ``node.series.load``'s.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset

from node.errors import VolumeError
from node.series.slices import Slice
from node.series.volume import MAX_MODALITY_ABS, StoredFormat


def decoded_pixels(ds: Dataset, name: str) -> np.ndarray:
    """The stored pixel values of the image ``ds`` (all frames of a multi-frame object), decoded, once its encoding
    is checked: pixel data present, grey levels (MONOCHROME1/2, one sample per pixel), HighBit = BitsStored - 1, a
    frame count equal to NumberOfFrames. VolumeError naming ``name`` and the reason otherwise."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise VolumeError(f"{name}: has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        # one sample per pixel that is not a grey level (PALETTE COLOR: an index into a colour table); it was
        # interpolated as if it were one and written as MONOCHROME2 (only the defined terms are quoted)
        said = photometric if photometric in ("PALETTE COLOR", "") else "another value"
        raise VolumeError(f"{name}: PhotometricInterpretation {said or '(empty)'}: its pixel values are not grey "
                          "levels (CT and MR images are MONOCHROME1 or MONOCHROME2); not super-resolved")
    bits = int(ds.get("BitsStored", 16) or 16)
    high = ds.get("HighBit")
    if high not in (None, "") and int(high) != bits - 1:
        # PS3.3 C.7.6.3: HighBit is BitsStored - 1 (the stored bits at the bottom of each word); an ACR-NEMA layout
        # with the bits higher up was read by pydicom as the low bits, garbage, and derived as if it were values
        raise VolumeError(f"{name}: HighBit {int(high)} with BitsStored {bits} (the standard has HighBit = "
                          "BitsStored - 1): its stored values cannot be read as they are meant; not super-resolved")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; translated once here
        ts = (ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else "") or "not stated"
        raise VolumeError(f"{name}: pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"{name}: colour image ({ds.get('PhotometricInterpretation', '') or 'PhotometricInterpretation not stated'}); "
                          "only grayscale series can be super-resolved")
    arr = np.asarray(arr)
    declared = int(ds.get("NumberOfFrames", 1) or 1)
    held = int(arr.shape[0]) if arr.ndim == 3 else 1
    if held != declared:
        # pydicom returns every whole frame the pixel data holds (with a warning): frames beyond NumberOfFrames
        # were left out of the volume silently (or a single-frame image failed to broadcast, its file unnamed)
        raise VolumeError(f"{name}: its pixel data holds {held} frames, NumberOfFrames {declared} (absent: 1); "
                          "which frames the header describes cannot be told, none is stacked")
    return arr


def stored_format(ds: Dataset, slope: float, intercept: float) -> StoredFormat:
    """The slice's stored-value format: its own rescale, BitsStored (default 16) and PixelRepresentation."""
    bits = int(ds.get("BitsStored", 16) or 16)
    return StoredFormat(float(slope), float(intercept), bits, bool(int(ds.get("PixelRepresentation", 0) or 0)))


def representable_range(ds: Dataset, slope: float, intercept: float) -> tuple[float, float]:
    """Lowest and highest modality value the slice ``ds`` can hold with this rescale."""
    return stored_format(ds, slope, intercept).value_range


def modality_values(ds: Dataset, s: Slice, decoded: np.ndarray) -> np.ndarray:
    """(Y, X) float64 modality values of slice ``s`` (NaN: padding, PixelPaddingValue of its header ``ds``) from
    its header's decoded pixels ``decoded`` (all frames of a multi-frame object): stored * slope + intercept.
    VolumeError when they reach beyond what the derived objects can hold (``check_range``)."""
    frame = decoded[s.frame] if s.frame >= 0 and decoded.ndim == 3 else decoded
    stored = frame.astype(np.float64)
    pad = padding_mask(ds, frame)
    with np.errstate(over="ignore", invalid="ignore"):
        vals = stored * s.slope + s.intercept
    if pad is not None and pad.any():
        vals[pad] = np.nan
    check_range(vals, s)
    return vals


def check_range(vals: np.ndarray, s: Slice) -> None:
    """VolumeError when slice ``s``'s modality values ``vals`` (NaN: padding) reach beyond ``MAX_MODALITY_ABS``
    or overflow (a rescale that makes values no derived object can hold, e.g. a RescaleSlope of 1e30: they were
    written with a window dciodvfy rejects, or became infinite in float32)."""
    if not vals.size:
        return
    lo, hi = float(np.fmin.reduce(vals, axis=None)), float(np.fmax.reduce(vals, axis=None))  # NaN skipped
    if math.isnan(lo):  # padding only
        return
    peak = max(abs(lo), abs(hi))
    if not math.isfinite(peak) or peak > MAX_MODALITY_ABS:
        raise VolumeError(f"{s.where}: RescaleSlope {s.slope:g} / RescaleIntercept {s.intercept:g} make modality "
                          f"values up to {peak:.3g} in magnitude, beyond the {MAX_MODALITY_ABS:g} the derived "
                          "objects can hold; the series is not super-resolved")


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Where ``stored`` (values of the image ``ds``) is padding (PixelPaddingValue, up to PixelPaddingRangeLimit);
    None when the header states no padding. Each value is read as the bit pattern of the pixel representation
    (``padding_value``), whatever VR it was written with."""
    if "PixelPaddingValue" not in ds:
        return None
    a = padding_value(ds, "PixelPaddingValue")
    if a is None:
        return None
    b = padding_value(ds, "PixelPaddingRangeLimit")
    lo, hi = (a, a) if b is None else (min(a, b), max(a, b))
    return (stored >= lo) & (stored <= hi)  # type: ignore[no-any-return]


def padding_value(ds: Dataset, keyword: str) -> int | None:
    """PixelPaddingValue / PixelPaddingRangeLimit of ``ds`` as a stored pixel value; None when absent or empty.

    Their VR is US or SS as the pixels are unsigned or signed (PS3.3 C.7.5.1.1.2), but a writer may use the other
    one (or UN / OB bytes): -1000 written as US reads 64536, 65535 written as SS reads -1, and no pixel matched,
    the padding then derived as values (a ring of -2000 or 64511 HU). The element's 16 bits are read as the pixel
    representation says: two's complement when PixelRepresentation is 1, else unsigned."""
    if keyword not in ds:
        return None
    elem = ds[keyword]
    value = elem.value
    signed = bool(int(ds.get("PixelRepresentation", 0) or 0))
    if isinstance(value, (bytes, bytearray)):  # UN / OB: the element's bytes in the data set's byte order
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
    if -(2 ** 15) <= v < 2 ** 16:  # a 16-bit US / SS value: its bit pattern as the pixels read it
        v &= 0xFFFF
        return v - 2 ** 16 if signed and v >= 2 ** 15 else v
    return v  # beyond 16 bits (32-bit pixels of a writer that used UL / SL): as written
