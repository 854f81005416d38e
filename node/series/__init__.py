"""Stage ``series``: DICOM headers → placed slices → one ``SeriesVolume`` → regular runs.

The door of the stage: other stages import from ``node.series`` only. Inside, imports run one way:
``slices`` (headers → placed slices), ``instances`` (one copy per SOPInstanceUID), ``mosaic`` (Siemens mosaics
→ their slices), ``planes`` (orientation within tolerance), ``split`` (several volumes in one series) and ``steps``
(step tolerances) ← ``volume`` (the model) ← ``runs`` ← ``load``. Geometry comes only from ImagePositionPatient / ImageOrientationPatient (or the enhanced functional
groups), never from InstanceNumber.
"""

from node.series.load import load_series, load_volumes, representable_range
from node.series.runs import check_through_plane, regular_runs
from node.series.slices import (
    ENHANCED_CT,
    ENHANCED_MR,
    group_value,
    read_header,
    sop_class_of,
    sop_instance_of,
)
from node.series.steps import MIN_SLICES_THROUGH_PLANE, describe_steps, same_step
from node.series.volume import SeriesVolume

__all__ = [
    "ENHANCED_CT",
    "ENHANCED_MR",
    "MIN_SLICES_THROUGH_PLANE",
    "SeriesVolume",
    "check_through_plane",
    "describe_steps",
    "group_value",
    "load_series",
    "load_volumes",
    "read_header",
    "regular_runs",
    "representable_range",
    "same_step",
    "sop_class_of",
    "sop_instance_of",
]
