"""Whether an input image has been through lossy compression (PS3.3 C.7.6.1.1.5): a derived image made from it must
say so (LossyImageCompression "01" is never reset in derived images), with the ratio and method when they are known.

An image is lossy when its header says LossyImageCompression "01", when its transfer syntax is lossy only (JPEG
baseline and extended, the MPEG/HEVC video syntaxes), or when a syntax that may be either holds a lossy codestream:
JPEG 2000 / HTJ2K coded with the irreversible 9-7 wavelet (COD marker), JPEG-LS with NEAR > 0 (SOS marker). A JPEG
2000 stream truncated after the reversible 5-3 wavelet cannot be told from a lossless one without its header flag.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pydicom import encaps
from pydicom.dataset import Dataset

_JPEG = "ISO_10918_1"
# transfer syntaxes that are lossy whatever the stream (PS3.5 Table A-1), with the method's defined term
LOSSY_ONLY = {
    "1.2.840.10008.1.2.4.50": _JPEG,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _JPEG,  # JPEG Extended (Process 2 & 4)
    **{f"1.2.840.10008.1.2.4.{n}": "" for n in range(100, 109)},  # MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265
}
_J2K = {"1.2.840.10008.1.2.4.91": "ISO_15444_1", "1.2.840.10008.1.2.4.203": "ISO_15444_15"}
_JLS_NEAR = {"1.2.840.10008.1.2.4.81": "ISO_14495_1"}


@dataclass(frozen=True)
class LossyCompression:
    """An input image's lossy compression: LossyImageCompressionRatio and LossyImageCompressionMethod values as
    stated (or the method of its transfer syntax when none is stated); empty when unknown."""

    ratios: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


def _values(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else [value]
    return tuple(str(v).strip() for v in items if str(v).strip())


_CS = re.compile(r"[A-Z0-9_ ]{1,16}")  # Code String (PS3.5 6.2)


def _ratio_ok(text: str) -> bool:
    try:
        return len(text) <= 16 and math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


def _first_frame(ds: Dataset) -> bytes:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return bytes(next(encaps.generate_frames(ds.PixelData, number_of_frames=frames)))


def _j2k_irreversible(stream: bytes) -> bool:
    """True when the JPEG 2000 codestream's COD marker names the irreversible 9-7 wavelet (ISO 15444-1 A.6.1)."""
    start = stream.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: the codestream (also inside a JP2 wrapper)
    if start < 0:
        return False
    pos = start + 2
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker, length = stream[pos + 1], int.from_bytes(stream[pos + 2:pos + 4], "big")
        if marker == 0x52:  # COD: Lcod(2) Scod(1) SGcod(4) SPcod: levels, xcb, ycb, style, transformation
            return pos + 13 < len(stream) and stream[pos + 13] == 0
        if marker in (0x90, 0x93) or length < 2:  # SOT / SOD: the main header ended without a COD
            return False
        pos += 2 + length
    return False


def _jls_near(stream: bytes) -> bool:
    """True when the JPEG-LS stream's first scan has NEAR > 0 (ISO 14495-1 C.2.3: near-lossless)."""
    pos = 2 if stream[:2] == b"\xff\xd8" else -1
    while 0 <= pos and pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker, length = stream[pos + 1], int.from_bytes(stream[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # SOS: Ls(2) Ns(1) (Ci, Tmi) x Ns, NEAR, ILV, Al/Ah
            near = pos + 5 + 2 * stream[pos + 4]
            return near < len(stream) and stream[near] > 0
        if length < 2:
            return False
        pos += 2 + length
    return False


def lossy_compression(ds: Dataset) -> LossyCompression | None:
    """The lossy compression the image ``ds`` has been through (module docstring), None when it has not (as far as
    its header, transfer syntax and codestream tell). Never raises: a stream that cannot be parsed counts as not
    shown lossy by its stream (its header flag still counts)."""
    stated = str(ds.get("LossyImageCompression", "") or "").strip() == "01"
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    method = LOSSY_ONLY.get(ts, _J2K.get(ts, _JLS_NEAR.get(ts, "")))
    lossy = stated or ts in LOSSY_ONLY
    if not lossy and (ts in _J2K or ts in _JLS_NEAR) and "PixelData" in ds:
        try:
            stream = _first_frame(ds)
            lossy = _j2k_irreversible(stream) if ts in _J2K else _jls_near(stream)
        except Exception:  # noqa: BLE001 - untrusted encapsulation; the decoder names the problem when it decodes
            lossy = False
    if not lossy:
        return None
    ratios = _values(ds.get("LossyImageCompressionRatio"))
    methods = _values(ds.get("LossyImageCompressionMethod"))
    if not all(_ratio_ok(r) for r in ratios):
        ratios = ()  # a value that is no DS is not copied (the flag is what matters)
    if not all(_CS.fullmatch(m) for m in methods):
        methods = ()
    if not ratios and not methods and method:
        methods = (method,)
    return LossyCompression(ratios, methods)
