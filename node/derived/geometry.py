"""Derived geometry: where every derived slice lies, and the gate that re-checks it before anything leaves.

Positions are recomputed from the input positions as ``models.engine`` documents the output grid: through-plane,
new slices lie between consecutive input slice positions (on the original slice line); in-plane, the first pixel
centre moves back by (g - 1) / 2g of an input pixel along the row and column directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from models.engine import Factors
from node.errors import DeriveError
from node.series import SeriesVolume

GEOMETRY_TOL_MM = 1e-3  # how far (mm) a derived slice position may lie from where it must be


def output_positions(vol: SeriesVolume, factors: Factors) -> np.ndarray:
    """(Z', 3) float64 ImagePositionPatient (mm) of every derived slice, Z' = (Z - 1) x f + 1: on the original
    slice line (linear between input positions), first pixel centre moved in-plane by (g - 1) / 2g pixel."""
    f, g = factors.through_plane, factors.in_plane
    n = vol.shape[0]
    nz = (n - 1) * f + 1
    out = np.empty((nz, 3))
    for k in range(nz):
        i, r = divmod(k, f)
        if i >= n - 1:
            out[k] = vol.positions[n - 1]
        else:
            t = r / f
            out[k] = vol.positions[i] + t * (vol.positions[i + 1] - vol.positions[i])
    return out - _in_plane_shift(vol, g)  # type: ignore[no-any-return]


def _in_plane_shift(vol: SeriesVolume, g: int) -> np.ndarray:
    """(3,) how far the first pixel centre moves when each pixel is split g x g."""
    dy, dx = vol.spacing[1], vol.spacing[2]
    return (g - 1) / (2 * g) * (dx * vol.row_cosine + dy * vol.col_cosine)  # type: ignore[no-any-return]


def geometry_gate(derived: Sequence[Dataset], vol: SeriesVolume, factors: Factors) -> None:
    """Re-check the derived objects' geometry against the input volume; DeriveError names what is wrong.

    Checks the slice count; the first and last positions and every position's distance from the original slice
    line (within ``GEOMETRY_TOL_MM``); the step along the normal (regular inputs; within 1.1 % of the input
    step); PixelSpacing of the first slice; Rows / Columns, ImageOrientationPatient and SliceThickness of the
    first and last (PS3.3 C.7.6.2 Image Plane Module).
    """
    f, g = factors.through_plane, factors.in_plane
    name = f"series {vol.series_uid}: derived geometry gate"
    n = vol.shape[0]
    want_n = (n - 1) * f + 1
    if len(derived) != want_n:
        raise DeriveError(f"{name}: {len(derived)} slices, expected {want_n}")
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in derived])
    dy, dx = vol.spacing[1], vol.spacing[2]
    shift = _in_plane_shift(vol, g)
    for k_in, k_out in ((0, 0), (n - 1, want_n - 1)):
        err = float(np.linalg.norm(ipp[k_out] + shift - vol.positions[k_in]))
        if err > GEOMETRY_TOL_MM:
            raise DeriveError(f"{name}: slice {k_out + 1} is {err:.4f} mm off input slice {k_in + 1}")
    if n > 1:
        steps = np.diff(ipp @ vol.normal)
        want = vol.spacing[0] / f
        if not vol.irregular and np.max(np.abs(steps - want)) > max(GEOMETRY_TOL_MM, 0.011 * want * f):
            raise DeriveError(f"{name}: step varies ({steps.min():.4f}..{steps.max():.4f} mm), expected {want:.4f}")
        # every position on the original slice line
        for k in range(want_n):
            i = min(k // f, n - 2)
            a, b = vol.positions[i], vol.positions[i + 1]
            p = ipp[k] + shift
            t = float(np.dot(p - a, b - a) / max(float(np.dot(b - a, b - a)), 1e-12))
            off = float(np.linalg.norm(a + t * (b - a) - p))
            if off > GEOMETRY_TOL_MM or t < -1e-6 or t > 1 + 1e-6:
                raise DeriveError(f"{name}: slice {k + 1} is {off:.4f} mm off the original slice line")
    ps = [float(v) for v in derived[0].PixelSpacing]
    if abs(ps[0] - dy / g) > 1e-6 * max(1.0, dy) or abs(ps[1] - dx / g) > 1e-6 * max(1.0, dx):
        raise DeriveError(f"{name}: PixelSpacing {ps}, expected {[dy / g, dx / g]}")
    rows, cols = vol.shape[1] * g, vol.shape[2] * g
    for d in (derived[0], derived[-1]):
        if int(d.Rows) != rows or int(d.Columns) != cols:
            raise DeriveError(f"{name}: matrix {d.Rows}x{d.Columns}, expected {rows}x{cols}")
        iop = np.array([float(v) for v in d.ImageOrientationPatient])
        if np.max(np.abs(iop - np.concatenate([vol.row_cosine, vol.col_cosine]))) > 1e-6:
            raise DeriveError(f"{name}: ImageOrientationPatient changed")
        # SliceThickness claims resolution: the acquired nominal thickness, never the (finer) new step
        thick = str(d.get("SliceThickness", "") or "")
        if vol.slice_thickness > 0 and (not thick or abs(float(thick) - vol.slice_thickness) > 1e-6):
            raise DeriveError(f"{name}: SliceThickness {thick or '(empty)'}, expected the acquired "
                              f"{vol.slice_thickness:.6g} mm")
        between = str(d.get("SpacingBetweenSlices", "") or "")
        if between and abs(float(between) - vol.spacing[0] / f) > 1e-6 * max(1.0, vol.spacing[0]):
            raise DeriveError(f"{name}: SpacingBetweenSlices {between}, expected {vol.spacing[0] / f:.6g}")
