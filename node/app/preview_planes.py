"""The geometry of the preview: which array axis of a ``SeriesVolume`` is which patient direction, and cuts in the
axial, coronal and sagittal planes resampled to square millimetre pixels, oriented as viewers show them.

Patient coordinates are DICOM's (LPS): +x towards the patient's left, +y posterior, +z head. Array axis 0 (slices)
runs along ``vol.normal`` (slices sorted by ImagePositionPatient . normal), axis 1 (rows) along ``col_cosine``,
axis 2 (columns) along ``row_cosine``. An oblique volume is cut along its own axes nearest to the anatomical
planes (no rotation), and its edges are labelled with the letters of the real directions ("A", "AH").

Display convention (radiological): axial seen from the feet (anterior up, patient's right on the image left),
coronal seen from the front (head up, right on the left), sagittal seen from the patient's left (head up,
anterior on the left).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from node.series import SeriesVolume

# plane -> (patient axis perpendicular to it, (patient axis, sign) down the image, (patient axis, sign) to the right)
PLANES: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "axial": (2, (1, +1), (0, +1)),
    "coronal": (1, (2, -1), (0, +1)),
    "sagittal": (0, (2, -1), (1, +1)),
}
PLANE_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # plane perpendicular to patient axis x, y, z
_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # negative / positive end of patient x, y, z


def axis_directions(vol: SeriesVolume) -> np.ndarray:
    """(3, 3): row ``a`` is the unit patient direction of increasing index along array axis ``a``."""
    d = np.stack([vol.normal, vol.col_cosine, vol.row_cosine]).astype(np.float64)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def patient_axes(vol: SeriesVolume) -> tuple[int, int, int]:
    """For array axes (0, 1, 2), the patient axis (0 x L-R, 1 y A-P, 2 z H-F) each runs closest to (one each)."""
    d = np.abs(axis_directions(vol))
    best = max(permutations(range(3)), key=lambda p: sum(d[a, p[a]] for a in range(3)))
    return int(best[0]), int(best[1]), int(best[2])


def acquisition_plane(vol: SeriesVolume) -> str:
    """'axial', 'coronal' or 'sagittal': the anatomical plane the slices were acquired in (nearest)."""
    return PLANE_OF_AXIS[patient_axes(vol)[0]]


def shown_spacing(vol: SeriesVolume, plane: str) -> tuple[float, float]:
    """(finer sample spacing, longer side) in mm of the two array axes ``plane`` shows."""
    a_perp = patient_axes(vol).index(PLANES[plane][0])
    shown = [a for a in range(3) if a != a_perp]
    return min(vol.spacing[a] for a in shown), max(vol.shape[a] * vol.spacing[a] for a in shown)


def orientation_letters(direction: np.ndarray, tolerance: float = 0.35) -> str:
    """The letters of a patient direction, strongest first, as viewers mark image edges: (1, 0, 0) -> 'L',
    (0, -0.8, 0.6) -> 'AH'; components under ``tolerance`` (of a unit vector) are left out."""
    v = np.asarray(direction, dtype=np.float64)
    v = v / max(float(np.linalg.norm(v)), 1e-12)
    order = np.argsort(-np.abs(v))
    out = [_LETTERS[i][int(v[i] > 0)] for i in order if abs(v[i]) >= tolerance]
    return "".join(out) or _LETTERS[int(order[0])][int(v[order[0]] > 0)]


def slice_coordinates(vol: SeriesVolume, point: np.ndarray) -> np.ndarray:
    """(Z,): each slice's position along the normal, mm from ``point`` (irregular steps kept)."""
    return np.asarray(vol.positions @ vol.normal - np.asarray(point, np.float64) @ vol.normal)


def inplane_coordinates(vol: SeriesVolume, point: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Array axis ``axis`` (1 rows, 2 columns) of slice ``k``: each sample's position along that axis' direction,
    mm from ``point``; measured from that slice's own position, so a gantry-tilted (sheared) stack lines up."""
    step, direction = (vol.spacing[1], vol.col_cosine) if axis == 1 else (vol.spacing[2], vol.row_cosine)
    rel = np.asarray(point, np.float64) - vol.positions[k]
    return np.asarray(np.arange(vol.shape[axis]) * step - rel @ direction)


def volume_centre(vol: SeriesVolume) -> np.ndarray:
    """The patient position (mm) of the middle of the volume."""
    z, y, x = vol.shape
    mid = (vol.positions[0] + vol.positions[-1]) / 2
    return np.asarray(mid + vol.col_cosine * vol.spacing[1] * (y - 1) / 2
                      + vol.row_cosine * vol.spacing[2] * (x - 1) / 2, dtype=np.float64)


@dataclass(frozen=True)
class Cut:
    """One plane through a volume, resampled to square pixels of ``pixel_mm``.

    ``image`` (rows, cols): NaN outside the volume. ``rows_mm`` / ``cols_mm``: the position of each pixel centre
    down / across the image, mm from the cut's point. ``down`` / ``right``: the patient direction (unit vector) of
    increasing row / column. ``index``: the array index of the cut along ``axis`` (the array axis across it).
    """

    plane: str
    image: np.ndarray
    rows_mm: np.ndarray
    cols_mm: np.ndarray
    pixel_mm: float
    down: np.ndarray
    right: np.ndarray
    axis: int
    index: int

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """matplotlib ``imshow`` extent (left, right, bottom, top) for ``origin='upper'``, in mm."""
        h = self.pixel_mm / 2
        return (float(self.cols_mm[0] - h), float(self.cols_mm[-1] + h), float(self.rows_mm[-1] + h),
                float(self.rows_mm[0] - h))

    def edges(self) -> dict[str, str]:
        """Orientation letters of the four edges: {'top', 'bottom', 'left', 'right'}."""
        return {"top": orientation_letters(-self.down), "bottom": orientation_letters(self.down),
                "left": orientation_letters(-self.right), "right": orientation_letters(self.right)}


def _resample(a: np.ndarray, coords: np.ndarray, new: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` from sample positions ``coords`` to ``new`` (NaN beyond half a
    step outside the samples)."""
    order = np.argsort(coords)
    c, a = coords[order], np.take(a, order, axis=axis)
    n = len(c)
    f = np.interp(new, c, np.arange(n, dtype=np.float64))
    i0 = np.clip(np.floor(f).astype(int), 0, n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1, 1]
    shape[axis] = len(new)
    w = (f - i0).reshape(shape)
    out = np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w
    half = (float(np.median(np.diff(c))) if n > 1 else 1.0) / 2
    outside = ((new < c[0] - half) | (new > c[-1] + half)).reshape(shape)
    return np.where(outside, np.nan, out)


def _grid(coords: np.ndarray, pixel_mm: float) -> np.ndarray:
    lo, hi = float(np.min(coords)), float(np.max(coords))
    n = max(1, int(round((hi - lo) / pixel_mm)) + 1)
    return lo + np.arange(n) * pixel_mm


def cut(vol: SeriesVolume, plane: str, point: np.ndarray, pixel_mm: float | None = None) -> Cut:
    """The ``plane`` ('axial', 'coronal', 'sagittal') through the voxel nearest ``point`` (patient mm), oriented
    for display (``PLANES``) and resampled to square pixels (default: the finer spacing of its two axes).

    A plane across the slices (a reformat) takes, in each slice, the row or column nearest the point and places it
    by that slice's own position: irregular steps and gantry tilt are drawn where they are."""
    perp, (p_down, s_down), (p_right, s_right) = PLANES[plane]
    axes = patient_axes(vol)
    a_perp, a_down, a_right = (axes.index(p) for p in (perp, p_down, p_right))
    d = axis_directions(vol)
    sign = {a_down: 1.0 if d[a_down, p_down] * s_down >= 0 else -1.0,
            a_right: 1.0 if d[a_right, p_right] * s_right >= 0 else -1.0}
    t = slice_coordinates(vol, point)
    near = int(np.argmin(np.abs(t)))
    if a_perp == 0:  # the acquisition plane: one slice
        index = near
        img, coords = vol.data[index], {a: inplane_coordinates(vol, point, index, a) * sign[a] for a in (1, 2)}
        steps = [vol.spacing[a_down], vol.spacing[a_right]]
        if a_down > a_right:  # rows of the image = columns of the slice
            img = img.T
    else:  # a reformat: slices x (the in-plane axis shown)
        a_in = 3 - a_perp
        across = [np.abs(inplane_coordinates(vol, point, k, a_perp)) for k in range(vol.shape[0])]
        picks = [int(np.argmin(c)) for c in across]
        index = picks[near]
        # a slice the plane misses (a sheared stack's end) is left empty, not filled with its edge row
        lines = [np.take(vol.data[k], i, axis=a_perp - 1) if across[k][i] <= vol.spacing[a_perp]
                 else np.full(vol.shape[3 - a_perp], np.nan, np.float32) for k, i in enumerate(picks)]
        placed = [inplane_coordinates(vol, point, k, a_in) * sign[a_in] for k in range(vol.shape[0])]
        steps = [float(np.median(np.abs(np.diff(t)))) if len(t) > 1 else vol.spacing[0], vol.spacing[a_in]]
        steps = steps if a_down == 0 else steps[::-1]
        pix0 = float(pixel_mm or max(min(steps), 1e-3))
        grid = _grid(np.concatenate(placed), pix0)
        img = np.stack([_resample(line[None, :], c, grid, 1)[0] for line, c in zip(lines, placed, strict=True)])
        coords = {0: t * sign[0], a_in: grid}
        if a_down != 0:
            img = img.T
    pix = float(pixel_mm or max(min(steps), 1e-3))
    rows, cols = _grid(coords[a_down], pix), _grid(coords[a_right], pix)
    img = _resample(_resample(np.asarray(img, np.float32), coords[a_down], rows, 0), coords[a_right], cols, 1)
    return Cut(plane, img, rows, cols, pix, d[a_down] * sign[a_down], d[a_right] * sign[a_right], a_perp, index)
