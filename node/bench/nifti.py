"""Where a volume's voxels lie, and NIfTI files written and read on that geometry (for ``srnode bench peers``).

A ``Geometry`` is the DICOM placement of a (Z, Y, X) volume (IPP of voxel (0, 0, 0), IOP's two halves, slice step,
PixelSpacing; LPS mm, PS3.3 C.7.6.2). ``nifti_affine`` turns it into the NIfTI-1 affine of the same voxels stored
as nibabel data (X, Y, Z) (RAS: x and y negated), ``write_nifti`` / ``load_nifti`` write and read such files
(nibabel), and ``read_onto`` reads a peer's output back onto a geometry through the two affines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.errors import VolumeError

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient (LPS) <-> NIfTI world (RAS)


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a (Z, Y, X) volume lie in DICOM patient space (LPS, mm).

    ``origin``: ImagePositionPatient of voxel (0, 0, 0); ``row_cosine``: direction of increasing column index x
    (IOP[0:3]); ``col_cosine``: of increasing row index y (IOP[3:6]); ``step``: vector from one slice's position to
    the next (mm); ``pixel``: (dy, dx) PixelSpacing (row, column spacing) in mm.
    """

    origin: np.ndarray  # (3,)
    row_cosine: np.ndarray  # (3,)
    col_cosine: np.ndarray  # (3,)
    step: np.ndarray  # (3,)
    pixel: tuple[float, float]

    def positions(self, n: int) -> np.ndarray:
        """(n, 3) ImagePositionPatient of slices 0..n-1."""
        return self.origin[None, :] + np.arange(n)[:, None] * self.step[None, :]


def geometry_of(positions: np.ndarray, row_cosine: np.ndarray, col_cosine: np.ndarray,
                pixel: tuple[float, float], offset: tuple[int, int] = (0, 0), every: int = 1) -> Geometry:
    """The geometry of slices ``positions[::every]`` (Z, 3 IPP, LPS mm; >= 2 slices, evenly spaced) cropped to
    start at row/column ``offset`` = (y0, x0). VolumeError when fewer than two slices remain."""
    pos = np.asarray(positions, float)[::every]
    if pos.shape[0] < 2:
        raise VolumeError("a geometry needs at least two slices")
    r, c = np.asarray(row_cosine, float), np.asarray(col_cosine, float)
    dy, dx = pixel
    origin = pos[0] + offset[1] * dx * r + offset[0] * dy * c
    step = (pos[-1] - pos[0]) / (pos.shape[0] - 1)
    return Geometry(origin, r, c, step, (float(dy), float(dx)))


def nifti_affine(g: Geometry) -> np.ndarray:
    """The NIfTI (RAS) affine of a volume stored as nibabel data (X, Y, Z) = ``volume.transpose(2, 1, 0)``:
    voxel (i, j, k) = (column, row, slice) -> mm. DICOM's LPS is turned into RAS by negating x and y."""
    a = np.eye(4)
    a[:3, 0] = g.row_cosine * g.pixel[1]
    a[:3, 1] = g.col_cosine * g.pixel[0]
    a[:3, 2] = g.step
    a[:3, 3] = g.origin
    return LPS_TO_RAS @ a


def dicom_positions(affine: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) ImagePositionPatient (LPS mm) of slices k = 0..n-1 of a NIfTI volume with ``affine`` (RAS)."""
    lps = LPS_TO_RAS @ affine
    return (lps @ np.stack([np.zeros(n), np.zeros(n), np.arange(n), np.ones(n)]))[:3].T


def write_nifti(path: Path, volume: np.ndarray, g: Geometry) -> None:
    """Write ``volume`` (Z, Y, X) as NIfTI-1 (float32, data (X, Y, Z), ``nifti_affine(g)`` as sform and qform)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32), nifti_affine(g))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))


def load_nifti(path: Path) -> Any:
    """A NIfTI image (nibabel SpatialImage: ``affine``, ``shape``, ``get_fdata``); VolumeError otherwise."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        img = nib.load(str(path))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise VolumeError(f"{path.name}: not readable as NIfTI: {exc}") from exc
    if not isinstance(img, SpatialImage) or img.affine is None:
        raise VolumeError(f"{path.name}: not a NIfTI volume with an affine")
    return img


def read_onto(path: Path, g: Geometry, shape: tuple[int, int, int]) -> np.ndarray:
    """A peer's NIfTI output on the grid of ``g`` with ``shape`` (Z, Y, X), float32.

    The output must share the in-plane grid of ``g`` (same columns and rows, any slice step along the same
    normal): each target slice is found in the output through the two affines and interpolated along the
    slice axis (cubic B-spline, mirrored at the ends). VolumeError when the grids do not line up in-plane.
    """
    from models.cubic import resample_axis

    img = load_nifti(path)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim != 3:
        raise VolumeError(f"{path.name}: expected a 3-D volume, got shape {data.shape}")
    m = np.linalg.inv(img.affine) @ nifti_affine(g)  # target voxel (i, j, k) -> output voxel
    inplane_ok = np.allclose(m[:3, :2], np.eye(3)[:, :2], atol=1e-3) and np.allclose(m[:2, 2:], 0, atol=1e-3)
    if not inplane_ok or abs(m[2, 2]) < 1e-6:
        raise VolumeError(f"{path.name}: its grid does not share the input's columns and rows "
                          f"(target -> output index map {np.round(m[:3], 4).tolist()})")
    if data.shape[:2] != (shape[2], shape[1]):
        raise VolumeError(f"{path.name}: in-plane matrix {data.shape[:2]} is not the input's {(shape[2], shape[1])}")
    k = m[2, 2] * np.arange(shape[0]) + m[2, 3]
    if k.min() < -1 or k.max() > data.shape[2]:
        log.warning("%s: target slices %.2f..%.2f extend past the output's 0..%d", path.name, k.min(), k.max(),
                    data.shape[2] - 1)
    return resample_axis(data, 2, k).transpose(2, 1, 0).astype(np.float32)


def regrid_ceiling(truth: np.ndarray, scale: float, shift: float, n_out: int) -> np.ndarray:
    """``truth`` (Z, Y, X) taken to a peer's slice grid (output slice k' at truth index (k' - shift) / scale,
    k' < ``n_out``) and back: what the regridding of ``read_onto`` alone does to a perfect output."""
    from models.cubic import resample_axis

    there = resample_axis(truth, 0, (np.arange(n_out) - shift) / scale)
    return resample_axis(there, 0, scale * np.arange(truth.shape[0]) + shift).astype(np.float32)
