"""A series for evaluation and training: a DICOM series folder or a ``.npz`` export, as engine input plus the
geometry of its slices (``srnode eval``, ``srnode train``, ``srnode bench peers`` / ``engine``).

The ``.npz`` format (for machines without the DICOM stack): data (Z, Y, X) int16/float, spacing (3,) mm (z, y, x),
thickness mm, modality, value_range (2,), positions (Z, 3) ImagePositionPatient mm, normal (3,); optional
row_cosine / col_cosine (3,) = ImageOrientationPatient[0:3] / [3:6].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.engine import VolumeInput
from node.errors import VolumeError


@dataclass(frozen=True)
class Loaded:
    """A series loaded for evaluation: engine input, where its slices lie (patient space, LPS mm), name.

    ``positions``: (Z, 3) ImagePositionPatient of each slice (``positions[0]``: the first slice's); ``normal``:
    (3,) the slice normal; ``row_cosine`` / ``col_cosine``: (3,) IOP[0:3] (direction of increasing column index)
    and IOP[3:6] (of increasing row index); ``orientation``: where those two came from ("DICOM", "npz", or
    "made up ..." for an export without them: ``inplane_cosines``). Spacing and slice thickness are ``vin``'s.
    """

    vin: VolumeInput
    positions: np.ndarray  # (Z, 3) mm
    normal: np.ndarray  # (3,)
    row_cosine: np.ndarray  # (3,)
    col_cosine: np.ndarray  # (3,)
    orientation: str
    name: str


def inplane_cosines(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (row, column) direction pair perpendicular to the unit ``normal`` (3,) with row x column = normal, as
    DICOM's IOP has (PS3.3 C.7.6.2.1.1): for an export that lacks IOP. VolumeError for a zero normal."""
    n = np.asarray(normal, float)
    nn = float(np.linalg.norm(n))
    if nn < 1e-9:
        raise VolumeError("the slice normal is zero")
    n = n / nn
    axis = np.eye(3)[int(np.argmin(np.abs(n)))]  # the patient axis least along the normal
    row = axis - n * float(axis @ n)
    row /= np.linalg.norm(row)
    return row, np.cross(n, row)


def load_volume(path: Path) -> Loaded:
    """A series folder (via ``node.series.load_series``) or a ``.npz`` export (data, spacing, thickness,
    modality, value_range, positions, normal; optional ``row_cosine`` / ``col_cosine``: IOP[0:3], IOP[3:6], else
    a pair is made up perpendicular to ``normal``), as engine input + slice geometry.

    VolumeError when the folder is missing, empty or not one volume, or the .npz is unreadable or lacks an array.
    """
    if path.suffix == ".npz":
        try:
            with np.load(path) as d:
                vin = VolumeInput(d["data"].astype(np.float32), tuple(float(s) for s in d["spacing"]),  # type: ignore[arg-type]
                                  float(d["thickness"]), str(d["modality"]),
                                  (float(d["value_range"][0]), float(d["value_range"][1])))
                positions, normal = np.asarray(d["positions"], float), np.asarray(d["normal"], float)
                has = "row_cosine" in d.files and "col_cosine" in d.files
                row = np.asarray(d["row_cosine"], float) if has else None
                col = np.asarray(d["col_cosine"], float) if has else None
        except (OSError, ValueError, KeyError) as exc:
            raise VolumeError(f"{path.name}: not a usable .npz export: {exc}") from exc
        orientation = "npz"
        if row is None or col is None:
            row, col = inplane_cosines(normal)
            orientation = "made up (npz without row_cosine/col_cosine)"
        return Loaded(vin, positions, normal, row, col, orientation, path.stem)
    from node.series import load_series  # the DICOM stack only where needed

    if not path.exists():
        raise VolumeError(f"{path}: does not exist")
    if not path.is_dir():
        raise VolumeError(f"{path}: not a series folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise VolumeError(f"{path}: no files")
    sv = load_series(files)
    return Loaded(sv.to_engine_input(), np.asarray(sv.positions, float), np.asarray(sv.normal, float),
                  np.asarray(sv.row_cosine, float), np.asarray(sv.col_cosine, float), "DICOM", path.name)
