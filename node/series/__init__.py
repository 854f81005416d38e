"""Stage ``series``: DICOM headers → placed slices → one ``SeriesVolume`` → regular runs.

The door of the stage: other stages import from ``node.series`` only. Inside, imports run one way:
``slices`` (headers → placed slices), ``instances`` (one copy per SOPInstanceUID), ``mosaic`` (Siemens mosaics
→ their slices), ``planes`` (orientation within tolerance), ``split`` (several volumes in one series) and ``steps``
(step tolerances) ← ``headers`` (what is kept of each input header after loading; the rest is read again from its
file when a derived object copies from it) ← ``volume`` (the model) ← ``runs`` and ``display`` (the series' window and photometric
interpretation) and ``pixels`` (one image's pixel encoding checked and decoded, its modality values) ← ``load``. Geometry comes only from ImagePositionPatient / ImageOrientationPatient (or the
enhanced functional groups), never from InstanceNumber.
"""

from node.series.display import series_photometric, series_voi, series_window, slice_window
from node.series.headers import InputHeaders, SliceHeader
from node.series.load import load_series, load_volumes
from node.series.pixels import representable_range, stored_format
from node.series.realworld import RealWorld
from node.series.runs import LeftOut, RunSplit, check_through_plane, regular_runs, split_runs
from node.series.slices import (
    ENHANCED_CT,
    ENHANCED_MR,
    group_value,
    is_localizer,
    read_header,
    sop_class_of,
    sop_instance_of,
)
from node.series.steps import MIN_SLICES_THROUGH_PLANE, describe_steps, same_step
from node.series.volume import MAX_MODALITY_ABS, SeriesVolume, StoredFormat

__all__ = [
    "is_localizer",
    "RealWorld",
    "MAX_MODALITY_ABS",
    "ENHANCED_CT",
    "ENHANCED_MR",
    "InputHeaders",
    "LeftOut",
    "MIN_SLICES_THROUGH_PLANE",
    "RunSplit",
    "SeriesVolume",
    "SliceHeader",
    "StoredFormat",
    "check_through_plane",
    "describe_steps",
    "group_value",
    "load_series",
    "load_volumes",
    "read_header",
    "regular_runs",
    "representable_range",
    "same_step",
    "series_photometric",
    "series_voi",
    "series_window",
    "slice_window",
    "sop_class_of",
    "sop_instance_of",
    "split_runs",
    "stored_format",
]
