"""How the source series is meant to be displayed: its VOI window and its photometric interpretation, taken from
the whole series (never from one slice: the first MPRAGE slice is noise, windowed 11/22, which would saturate
every derived slice).

A window is in modality units (after Rescale), so it holds for any output rescale.
"""

from __future__ import annotations

from collections import Counter
from statistics import median

from pydicom.dataset import Dataset

from node.series.headers import slice_window, voi_lut_key
from node.series.volume import SeriesVolume

__all__ = ["series_photometric", "series_window", "slice_window"]


def series_window(vol: SeriesVolume) -> tuple[list[float], list[float]] | None:
    """The series' window(s) in modality units: per window position, the median centre and the median width over
    every slice that has that many windows (the most common count). None when no slice has a window.

    A slice-wise window (Siemens MR computes one per slice) thus takes the value of the bulk of the stack, not of
    an edge slice.
    """
    windows = [rec.window for rec in vol.datasets.records if rec.window]  # slice_window of each, read at load
    if not windows:
        return None
    count = Counter(len(c) for c, _ in windows).most_common(1)[0][0]
    same = [(c, w) for c, w in windows if len(c) == count]
    centres = [float(median(c[i] for c, _ in same)) for i in range(count)]
    widths = [float(median(w[i] for _, w in same)) for i in range(count)]
    return centres, widths


def series_voi(vol: SeriesVolume) -> tuple[str, Dataset | None]:
    """The VOI LUT Function every slice with a window states alike ("" when none or they differ, or it is LINEAR,
    the default), and the VOI LUT item every slice states alike (None when any lacks it or they differ). Both act
    on modality values, which the derived series keeps whatever its own rescale: copied, the derived series
    displays as its source (field19: before, a SIGMOID window was shown LINEAR and a VOI LUT table dropped, the
    viewer falling back on the whole value range)."""
    records = vol.datasets.records
    functions = {rec.voi_function for rec in records if rec.window}
    function = functions.pop() if len(functions) == 1 else ""
    keys = {voi_lut_key(rec.voi_lut) for rec in records}
    lut = records[0].voi_lut if records and len(keys) == 1 and None not in keys else None
    return ("" if function == "LINEAR" else function), lut


def series_photometric(vol: SeriesVolume) -> tuple[str, str]:
    """(PhotometricInterpretation for the derived series, a remark or "").

    MONOCHROME1 (lowest value white) is kept when every slice is MONOCHROME1, so the derived series displays with
    the polarity of its source; a series that mixes MONOCHROME1 and MONOCHROME2 takes the interpretation of most of
    its slices, and the remark says so.
    """
    kinds = Counter((rec.photometric or "MONOCHROME2").strip().upper() for rec in vol.datasets.records)
    mono = {k: n for k, n in kinds.items() if k in ("MONOCHROME1", "MONOCHROME2")}
    if not mono:
        return "MONOCHROME2", ""
    pick = "MONOCHROME1" if mono.get("MONOCHROME1", 0) > mono.get("MONOCHROME2", 0) else "MONOCHROME2"
    if len(mono) > 1:
        return pick, (f"source slices mix MONOCHROME1 ({mono['MONOCHROME1']}) and MONOCHROME2 "
                      f"({mono['MONOCHROME2']}); derived series written as {pick}")
    return pick, ""
