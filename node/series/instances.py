"""One copy per SOPInstanceUID, as the node's ingest keeps them (``node.ingest``: a second C-STORE of an instance
is kept once); a folder given to ``srnode process`` often holds the same file twice ("IM0010 (1).dcm").

Two files with one SOPInstanceUID are the same instance when their pixel data are equal (byte for byte, or, when
the transfer syntaxes differ, after decoding) and so is what places them and gives their values meaning
(``node.meaning``: position, orientation, spacing, rescale, bits, functional groups...); the first by file name is
kept and the other named in a note. Two files with one SOPInstanceUID and different pixels, or the same pixels
placed elsewhere or rescaled otherwise, contradict each other: which one is right cannot be told, so the series is
refused naming both files (and the attributes that differ).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.errors import VolumeError
from node.meaning import meaning_differs
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


class UniqueInstances:
    """One entry per SOPInstanceUID, the files given one at a time (``add``), in the order they are to be kept:
    give them shortest name first to keep "IM0010.dcm" rather than its copy "IM0010 (1).dcm". ``notes``: one per
    dropped copy. Only the first file of each SOPInstanceUID is remembered (its path), not its dataset: a second
    copy is compared with the first read again (``reread``), so a long series never holds every header."""

    def __init__(self, reread: Callable[[Path], Dataset]) -> None:
        self._reread = reread
        self._first: dict[str, Path] = {}
        self.notes: list[str] = []

    def add(self, path: Path, ds: Dataset) -> bool:
        """Whether ``ds`` (read from ``path``) is kept: True for the first file of its SOPInstanceUID and for
        datasets without one; False (and a note) for a second copy with the same pixels. Raises VolumeError
        naming both files when two files share a SOPInstanceUID but not their pixels."""
        uid = sop_instance_of(ds)
        if not uid:
            return True
        p0 = self._first.get(uid)
        if p0 is None:
            self._first[uid] = path
            return True
        first = self._reread(p0)
        if not _same_pixels(first, ds):
            raise VolumeError(f"{p0.name} and {path.name} carry the same SOPInstanceUID but different pixel data; "
                              "one instance cannot have two images, and which one is right cannot be told")
        differ = meaning_differs(first, ds)  # same pixels placed elsewhere or meaning other values
        if differ:
            raise VolumeError(f"{p0.name} and {path.name} carry the same SOPInstanceUID but different "
                              f"{', '.join(differ)}; one instance cannot lie in two places or mean two things, and "
                              "which one is right cannot be told")
        self.notes.append(f"{path.name} is a second copy of {p0.name} (same SOPInstanceUID, same pixels): kept once")
        return False
