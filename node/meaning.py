"""What two copies of one SOPInstanceUID must agree on besides their pixel data to be the same image: where it lies
(geometry, frame of reference) and what its stored values mean (rescale, bits, padding, photometric
interpretation), and for an enhanced object its functional groups, which hold both per frame.

Two files with one SOPInstanceUID and the same stored pixels but another ImagePositionPatient or RescaleIntercept are
not one instance sent twice: which one is right cannot be told. ``srnode process`` refuses such a series
(``node.series.instances``); the node's ingest keeps the first copy and sets the other aside as a conflict
(``node.ingest.resend``). Used by both stages; the differences are named by attribute, never by value.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

# the attributes that place an image and give its stored values their meaning (PS3.3 C.7.6.2 Image Plane,
# C.7.6.3 Image Pixel, C.11.1 Modality LUT, C.7.4.1 Frame of Reference, C.7.6.16 functional groups)
MEANING_KEYWORDS = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "FrameOfReferenceUID",
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "PixelPaddingValue", "PixelPaddingRangeLimit", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


def meaning_differs(a: Dataset, b: Dataset) -> list[str]:
    """The ``MEANING_KEYWORDS`` whose values differ between the two copies ``a`` and ``b`` (absent in one and
    present in the other counts; an empty value is absent), in that order."""
    out = []
    for kw in MEANING_KEYWORDS:
        va, vb = a.get(kw), b.get(kw)
        va = None if va is None or va == "" else va
        vb = None if vb is None or vb == "" else vb
        if va != vb:  # pydicom compares DS / IS values as numbers ("-1024" is "-1024.0"), sequences by item
            out.append(kw)
    return out
