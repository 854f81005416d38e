"""Stage ``derived``: the objects the node writes, built as pydicom Datasets from the source series.

- ``image_series``: the derived image series (new UIDs, DERIVED\\SECONDARY, exact geometry, values in range);
- ``uncertainty``: the per-voxel sigma objects (Parametric Map, SC card);
- ``geometry``: where each output slice lies, and the gate every derived series passes before it leaves;
- ``iocm``: IHE IOCM rejection notes retiring superseded results;
- ``inputs``: checks on the input series first: one patient and study; copied values valid for their VR;
- ``modules``: the DICOM modules and UIDs they share.
"""

from node.derived.geometry import GEOMETRY_TOL_MM, geometry_gate, output_positions
from node.derived.image_series import DerivedObjects, check_identifiers, derive_series
from node.derived.inputs import (
    InputCheck,
    check_inputs,
    check_one_patient,
    conform_copied,
    conform_dataset,
    inspect_input,
)
from node.derived.iocm import reject_superseded, rejection_note, rejection_notes, result_revision
from node.derived.labels import Revision
from node.derived.uncertainty import uncertainty_objects

__all__ = ["GEOMETRY_TOL_MM", "DerivedObjects", "InputCheck", "inspect_input", "Revision", "check_identifiers", "check_inputs", "check_one_patient",
           "conform_copied", "conform_dataset", "derive_series", "geometry_gate", "output_positions", "reject_superseded",
           "rejection_note", "rejection_notes", "result_revision", "uncertainty_objects"]
