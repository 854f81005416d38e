"""One copy per SOPInstanceUID, as the node's ingest keeps them (``node.ingest``: a second C-STORE of an instance
is kept once); a folder given to ``srnode process`` often holds the same file twice ("IM0010 (1).dcm").

Two files with one SOPInstanceUID are the same instance when their pixel data are equal (byte for byte, or, when
the transfer syntaxes differ, after decoding); the first by file name is kept and the other named in a note.
Two files with one SOPInstanceUID and different pixels contradict each other: which one is right cannot be
told, so the series is refused naming both files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.errors import VolumeError
from node.series.slices import sop_instance_of


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _same_pixels(a: Dataset, b: Dataset) -> bool:
    """True when the two datasets carry the same image: equal pixel data bytes, or equal decoded pixels."""
    pa, pb = a.get("PixelData"), b.get("PixelData")
    if pa is None or pb is None:
        return pa is None and pb is None
    if _transfer_syntax(a) == _transfer_syntax(b) and pa == pb:
        return True
    try:
        return bool(np.array_equal(a.pixel_array, b.pixel_array))
    except Exception:  # noqa: BLE001 - a pixel decoder failure means the copies cannot be shown to be equal
        return False


def unique_instances(items: Sequence[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], list[str]]:
    """``items`` (file, dataset) with one entry per SOPInstanceUID, and one note per dropped copy.

    The first file (in the given order) of each SOPInstanceUID is kept; give the files shortest name first to keep
    "IM0010.dcm" rather than its copy "IM0010 (1).dcm". Datasets without a SOPInstanceUID are all
    kept. Raises VolumeError naming both files when two files share a SOPInstanceUID but not their pixels.
    """
    kept: list[tuple[Path, Dataset]] = []
    first: dict[str, tuple[Path, Dataset]] = {}
    notes: list[str] = []
    for path, ds in items:
        uid = sop_instance_of(ds)
        if not uid:
            kept.append((path, ds))
            continue
        if uid not in first:
            first[uid] = (path, ds)
            kept.append((path, ds))
            continue
        p0, ds0 = first[uid]
        if not _same_pixels(ds0, ds):
            raise VolumeError(f"{p0.name} and {path.name} carry the same SOPInstanceUID but different pixel data; "
                              "one instance cannot have two images, and which one is right cannot be told")
        notes.append(f"{path.name} is a second copy of {p0.name} (same SOPInstanceUID, same pixels): kept once")
    return kept, notes
