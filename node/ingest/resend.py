"""A resend of a SOPInstanceUID the spool already holds: the same instance again, or a conflict?

The first copy is kept (what a job may already have used). A resend that is the same instance (same bytes, or
the same pixel data, patient identity, position and value meaning (``node.meaning``) in another encoding) is a
plain duplicate. One that differs -- other pixel data, another patient identity, another study or series, the same
pixels at another position or with another rescale -- is a *conflict*: it is kept aside in
``spool/conflicts/`` and reported (``srnode status``, ``srnode_instance_conflicts_total``, the audit log), never
silently dropped and never mixed into the series.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.meaning import meaning_differs
from node.phi import IDENTITY_KEYWORDS, decoded_text
from node.store import Instance


def _transfer_syntax(ds: Dataset) -> str:
    return str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))


def _pixels_differ(a: Dataset, b: Dataset) -> str:
    """'' when the pixel data of ``a`` and ``b`` are the same, else the difference in words."""
    has_a, has_b = "PixelData" in a, "PixelData" in b
    if not has_a and not has_b:
        return "" if _content(a) == _content(b) else "different content"
    if has_a != has_b:
        return "pixel data present in only one copy"
    if _transfer_syntax(a) == _transfer_syntax(b):
        return "" if a.PixelData == b.PixelData else "different pixel data"
    try:  # another transfer syntax: compare what the pixels are
        same = np.array_equal(a.pixel_array, b.pixel_array)
    except Exception:  # noqa: BLE001 - a decoder missing or failing: cannot tell, so it counts as different
        return "pixel data in another transfer syntax that could not be compared"
    return "" if same else "different pixel data"


def _content(ds: Dataset) -> Dataset:
    out = Dataset()
    out.update({e.tag: e for e in ds})  # without the file meta
    return out


def resend_difference(kept: Instance, study_uid: str, series_uid: str, new_path: Path) -> str:
    """'' when the file at ``new_path`` is the instance already kept as ``kept``; else how it differs (names of
    attributes and words only, never their values)."""
    if (study_uid, series_uid) != (kept.study_uid, kept.series_uid):
        return "same SOPInstanceUID filed under another study or series"
    kept_path = Path(kept.path)
    try:
        if filecmp.cmp(kept_path, new_path, shallow=False):
            return ""
        a, b = dcmread(kept_path), dcmread(new_path)
    except Exception as exc:  # noqa: BLE001 - the kept copy gone or unreadable: keep the resend aside
        return f"the stored copy cannot be compared ({type(exc).__name__})"
    diffs = [f"{kw} differs" for kw in IDENTITY_KEYWORDS if decoded_text(a, kw) != decoded_text(b, kw)]
    diffs += [f"{kw} differs" for kw in meaning_differs(a, b)]  # same pixels placed elsewhere or rescaled otherwise
    pixels = _pixels_differ(a, b)
    return "; ".join(([pixels] if pixels else []) + diffs)
